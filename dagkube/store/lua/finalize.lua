-- A run's end: its status decided, its history written, its keys expiring, the status pushed
-- to its result list (what waiters block on). Needs history.lua.
local function finalize(run, now, ttl, cap)
  local meta = runkey(run, 'meta')
  local status = redis.call('HGET', meta, 'status')
  if status == 'running' then
    local done = tonumber(redis.call('HGET', meta, 'tasks_done') or '0')
    if done >= tonumber(redis.call('HGET', meta, 'tasks_total')) then
      status = 'succeeded'
    else
      status = 'failed'
      local message = 'the run ended with unfinished tasks'
      redis.call('HSET', meta, 'error', cjson.encode({message = message}))
    end
  elseif status == 'cancelling' then
    status = 'cancelled'
  end
  local submitted = tonumber(redis.call('HGET', meta, 'submitted_at'))
  local ended = now
  if status == 'succeeded' then
    ended = tonumber(redis.call('HGET', meta, 'completed_at') or now)
  end
  redis.call('HSET', meta, 'status', status, 'finished_at', now, 'makespan_s', ended - submitted)
  record_history(run, meta, now, cap)
  expire_run(run, ttl)
  redis.call('RPUSH', runkey(run, 'result'), status)
  redis.call('EXPIRE', runkey(run, 'result'), ttl)
  return status
end
