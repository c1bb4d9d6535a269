-- REQUEUE (calls.RequeueCall): re-queues a dead worker's held work at the head of a class
-- queue and records the loss. The task it was running is read from the worker's task key.
-- Killed for memory: the work goes one class up (the run's ``classes``), the attempt
-- travelling with the invocation (``escalations``) so the task's record keeps it; at the
-- largest class, the run fails. Lost for another reason: re-queued at most ``max re-queues``
-- times, then the run fails (a poison task must not loop). Returns the number of invocations
-- re-queued.
local pool, proc, task_key, beat_key = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local wid, now = ARGV[9], tonumber(ARGV[10])
local mem, spawned = tonumber(ARGV[11]), tonumber(ARGV[12])
local oom, peak, code = ARGV[13] == '1', tonumber(ARGV[14]), tonumber(ARGV[15])
local max_requeues = tonumber(ARGV[16])
local current = redis.call('GET', task_key)
current = current and cjson.decode(current) or {}
local function mib(bytes) return string.format('%d MiB', math.floor(bytes / 1048576 + 0.5)) end
local items = redis.call('LRANGE', proc, 0, -1)
local requeued = 0
for _, item in ipairs(items) do
  local inv = cjson.decode(item)
  local meta = runkey(inv.run, 'meta')
  local task, fn = '', '?'
  if current.run == inv.run then task, fn = current.task, current['function'] end
  inv.resume = true
  inv.requeued_from = wid
  local held_since = math.max(spawned, tonumber(inv.queued_at) or spawned)
  hist_hset(inv.run, 'workers', wid .. ':lost', cjson.encode({
    worker_id = wid, run_id = inv.run, memory_mib = mem, outcome = 'lost',
    spawned_at = spawned, finished_at = now, cold = true, oom_killed = oom,
    peak_memory_bytes = peak or cjson.null, exit_code = code or cjson.null,
    lost_task = task}))
  local exists = redis.call('EXISTS', meta) == 1
  if exists then
    redis.call('HINCRBYFLOAT', meta, 'gb_s', (now - held_since) * mem / 1024)
    redis.call('HINCRBY', meta, 'workers_lost', 1)
  end
  local failure = nil
  local what = task ~= '' and ('task ' .. task .. ' (' .. fn .. ')') or 'a worker of this run'
  -- Past its task's deadline the worker stopped itself (or the scaler stopped it): a timeout,
  -- re-run on a fresh worker while the task's retries last (counted per task).
  local timed_out = task ~= '' and current.deadline ~= nil and now >= tonumber(current.deadline)
  if timed_out then
    local counts = type(inv.timeouts) == 'table' and inv.timeouts or {}
    counts[task] = (counts[task] or 0) + 1
    inv.timeouts = counts
    if exists then redis.call('HINCRBY', meta, 'task_timeouts', 1) end
    local retries = tonumber(current.retries) or 0
    if counts[task] > retries then
      failure = {exc_type = 'TaskTimeout', message = what .. ' ran past its timeout of ' ..
        current.timeout_s .. 's (' .. counts[task] .. ' of ' .. (retries + 1) ..
        ' attempt(s)); its worker was stopped'}
    end
  elseif oom then
    if exists then redis.call('HINCRBY', meta, 'oom_kills', 1) end
    local bigger = nil
    for c in string.gmatch(exists and (redis.call('HGET', meta, 'classes') or '') or '', '%d+') do
      c = tonumber(c)
      if c > inv.mem and (bigger == nil or c < bigger) then bigger = c end
    end
    local escalations = inv.escalations or {}
    table.insert(escalations, {task = task, mem = inv.mem, peak = peak or cjson.null})
    inv.escalations = escalations
    if bigger then
      inv.mem = bigger
      if exists then redis.call('HINCRBY', meta, 'escalations', 1) end
    else
      failure = {exc_type = 'OutOfMemory', message = what .. ' was OOM-killed on the largest ' ..
        'class, ' .. inv.mem .. ' MiB (peak ' .. mib(peak or inv.mem * 1048576) .. ' seen; ' ..
        'classes: ' .. (exists and redis.call('HGET', meta, 'classes') or '?') .. ' MiB): ' ..
        'give it a larger class (--classes) or make it use less memory'}
    end
  else
    -- counted per task (a long-lived bound invocation may lose workers on several tasks),
    -- since the run last made progress: losses between which tasks completed, or lost
    -- outputs were re-run and stored (STORE), are no crash loop
    local counts = type(inv.requeues) == 'table' and inv.requeues or {}
    local progress = 0
    if exists then
      local fields = redis.call('HMGET', meta, 'tasks_done', 'outputs_stored')
      progress = (tonumber(fields[1]) or 0) + (tonumber(fields[2]) or 0)
    end
    if progress > (tonumber(inv.done_at_loss) or progress) then counts = {} end
    inv.done_at_loss = progress
    local key = task ~= '' and task or '-'
    counts[key] = (counts[key] or 0) + 1
    inv.requeues = counts
    if counts[key] > max_requeues then
      failure = {exc_type = 'WorkerLost', message = 'the worker running ' .. what ..
        ' died ' .. counts[key] .. ' times (last exit code ' .. (code or 'unknown') ..
        '); the run fails instead of retrying it again'}
    end
  end
  if failure == nil then
    redis.call('LPUSH', pool .. ':q:' .. inv.mem, cjson.encode(inv))
    redis.call('SADD', pool .. ':classes', inv.mem)
    requeued = requeued + 1
  elseif exists then
    failure.task_id, failure['function'], failure.worker_id = task, fn, wid
    if redis.call('HGET', meta, 'status') == 'running' then
      redis.call('HSET', meta, 'status', 'failed', 'error', cjson.encode(failure),
                 'failed_task', task)
      redis.call('HINCRBY', meta, 'tasks_failed', 1)
      stop_inboxes(inv.run)
    end
    -- This invocation ends here, not re-queued: the run ends with its last one.
    if redis.call('HINCRBY', meta, 'active', -1) <= 0
        and redis.call('EXISTS', runkey(inv.run, 'result')) == 0 then
      finalize(inv.run, now, tonumber(redis.call('HGET', meta, 'ttl_s') or '3600'),
               tonumber(redis.call('HGET', meta, 'history_cap') or '100'))
    end
  end
end
redis.call('DEL', proc, beat_key, task_key)
redis.call('HDEL', pool .. ':workers', wid)
redis.call('SREM', pool .. ':idle:' .. mem, wid)
redis.call('SREM', pool .. ':waiting', wid)
if requeued > 0 then wake(pool) end
return requeued
