-- COMPLETE (calls.CompleteCall): a task's output and record, and its downstream tasks made
-- ready. A flexible worker's proc list is rewritten to hold what it still has to run
-- (continuation, clustered children, pending roots), so a lost worker's remaining work is
-- re-queued.
-- The output: 'none' (not stored), 'inline' in ARGV[9] (small: a field of the run's output
-- hash, stored here), or 'apart' (large: written under its own key by the caller just before
-- this call, never copied through Lua, and taken up here: adopt_output).
-- ARGV[17]: the claim of the worker's next task ('' none), written to its task key if the
-- run goes on, with a TTL of ARGV[18].
local run, pool, tid = ARGV[5], ARGV[6], ARGV[7]
local output_mode, output, record, record_field = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local stored = output_mode ~= 'none'
local proc, task_key = ARGV[12], ARGV[13]
local me, my_mem, now = ARGV[14], tonumber(ARGV[15]), tonumber(ARGV[16])
local next_claim, claim_ttl = ARGV[17], tonumber(ARGV[18])
local meta = runkey(run, 'meta')
local i = 20
for _ = 1, tonumber(ARGV[19]) do
  hist_hset(run, 'tasks', ARGV[i], ARGV[i + 1])
  i = i + 2
end
local pending = {}
local n_pending = tonumber(ARGV[i])
i = i + 1
for _ = 1, n_pending do
  table.insert(pending, ARGV[i])
  i = i + 1
end
hist_hset(run, 'tasks', record_field, record)
-- the worker runs no task now (its task key is what a lost worker is charged with)
redis.call('DEL', task_key)
if output_mode == 'apart' then adopt_output(run, own_key(runkey(run, 'out'), tid)) end
local status = redis.call('HGET', meta, 'status') or 'missing'
if status ~= 'running' then return {status, '', 0} end
if redis.call('SADD', runkey(run, 'done'), tid) == 0 then return {status, '', 1} end
-- a bound worker's next task, ready now: what it runs from here (its claim)
if next_claim ~= '' then redis.call('SET', task_key, next_claim, 'EX', claim_ttl) end
if record_field ~= tid then redis.call('HINCRBY', meta, 'duplicates_won', 1) end
if output_mode == 'inline' then redis.call('HSET', runkey(run, 'out'), tid, output) end
local done_n = redis.call('HINCRBY', meta, 'tasks_done', 1)
if done_n >= tonumber(redis.call('HGET', meta, 'tasks_total')) then
  -- every output exists now: the run's makespan ends here, even if a duplicated task's
  -- original still runs (its worker's time is charged when it finishes)
  local clock = redis.call('TIME')
  redis.call('HSET', meta, 'completed_at', tonumber(clock[1]) + tonumber(clock[2]) / 1e6)
end
local continuation = ''
local local_ready = {}
local queued = 0
while i <= #ARGV do
  local down, ndeps = ARGV[i], tonumber(ARGV[i + 1])
  local worker, mem, host = ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4]
  local clustered = ARGV[i + 5] == '1'
  i = i + 6
  if stored and host ~= '' and host ~= me then
    local preload = runkey(run, 'preload:' .. host)
    redis.call('RPUSH', preload, tid)
    redis.call('SADD', runkey(run, 'keys'), preload)
  end
  local ready = false
  if ndeps == 1 then
    ready = redis.call('SADD', runkey(run, 'edges'), tid .. '>' .. down) == 1
  elseif redis.call('SADD', runkey(run, 'edges'), tid .. '>' .. down) == 1 then
    ready = redis.call('HINCRBY', runkey(run, 'depcount'), down, 1) == ndeps
  end
  if ready then
    -- dagkube.planning.rules.route, case for case (me: the producer's worker, '' flexible)
    if worker == '' then
      if me == '' and continuation == '' then
        continuation = down
      elseif me == '' and clustered then
        table.insert(local_ready, down)
      else
        queue_invocation(pool, {run = run, mem = mem, roots = {down}, queued_at = now})
        queued = queued + 1
      end
    elseif worker == me then
      table.insert(local_ready, down)
    else
      local inbox = runkey(run, 'inbox:' .. worker)
      redis.call('RPUSH', inbox, down)
      redis.call('SADD', runkey(run, 'keys'), inbox)
      local claim = runkey(run, 'claim:' .. worker)
      if redis.call('SET', claim, '1', 'NX') then
        redis.call('SADD', runkey(run, 'keys'), claim)
        queue_invocation(pool, {run = run, mem = mem, worker = worker, roots = {}, queued_at = now})
        queued = queued + 1
      end
    end
  end
end
if queued > 0 then
  redis.call('HINCRBY', meta, 'active', queued)
  wake(pool)
end
if me == '' then
  local roots = {}
  if continuation ~= '' then table.insert(roots, continuation) end
  for _, id in ipairs(local_ready) do table.insert(roots, id) end
  for _, id in ipairs(pending) do table.insert(roots, id) end
  -- Only while this worker still holds the invocation: the scaler may have re-queued it
  -- (heartbeat expired), and then the re-queued copy owns what is left.
  if #roots > 0 and redis.call('EXISTS', proc) == 1 then
    redis.call('DEL', proc)
    redis.call('RPUSH', proc, cjson.encode({run = run, mem = my_mem, roots = roots,
                                            queued_at = now}))
  end
end
local reply = {status, continuation, 0}
for _, id in ipairs(local_ready) do table.insert(reply, id) end
return reply
