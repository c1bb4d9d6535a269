"""Lua scripts: each state transition of a run is one atomic step in Redis.

A worker that dies between two scripts leaves a consistent state: its unfinished work is still
in its ``proc`` list (re-queued by the scaler), completed tasks are in the run's ``done`` set,
and dependency counting is guarded per (upstream, downstream) edge, so re-running a task
cannot over-count. Key names are derived inside the scripts from the run id and must match
:mod:`dagkube.runtime.keys` (standalone Redis; see docs/architecture.md).
"""

from __future__ import annotations

# Shared Lua helpers: key builders mirroring keys.py.
_PRELUDE = r"""
local function runkey(run, part) return 'dk:run:' .. run .. ':' .. part end
local function histkey(run, part) return 'dk:hist:r:' .. run .. ':' .. part end
local function wake(pool)
  redis.call('LPUSH', pool .. ':wake', '1')
  redis.call('LTRIM', pool .. ':wake', 0, 0)
end
local function queue_invocation(pool, inv)
  redis.call('RPUSH', pool .. ':q:' .. inv.mem, cjson.encode(inv))
  redis.call('SADD', pool .. ':classes', inv.mem)
end
local function stop_inboxes(run)
  for _, key in ipairs(redis.call('SMEMBERS', runkey(run, 'keys'))) do
    if string.find(key, ':inbox:', 1, true) then redis.call('RPUSH', key, '') end
  end
end
"""

# ARGV: run, pool prefix, task id, store flag, output, record json, record field (the task id,
#       or "<id>@dup" for a duplicate's), proc key, my worker id ("" = flexible), my class, now,
#       n amendments, [task id, record json]*n, n pending, [pending root id]*n,
#       [down id, ndeps, worker ("@" = clustered: runs here), mem, preload host]*
# Returns {status, continuation or "", duplicate 0/1, local-ready ids...}. A flexible worker's
# proc list is rewritten to hold what it still has to run (continuation, clustered children,
# pending roots), so a lost worker's remaining work is re-queued.
COMPLETE = (
    _PRELUDE
    + r"""
local run, pool, tid = ARGV[1], ARGV[2], ARGV[3]
local me, my_mem, now = ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11])
local meta = runkey(run, 'meta')
local i = 13
for _ = 1, tonumber(ARGV[12]) do
  redis.call('HSET', histkey(run, 'tasks'), ARGV[i], ARGV[i + 1])
  i = i + 2
end
local pending = {}
local n_pending = tonumber(ARGV[i])
i = i + 1
for _ = 1, n_pending do
  table.insert(pending, ARGV[i])
  i = i + 1
end
redis.call('HSET', histkey(run, 'tasks'), ARGV[7], ARGV[6])
-- the worker runs no task now (its ``task`` key is what a lost worker is charged with)
redis.call('DEL', (string.gsub(ARGV[8], ':proc$', ':task')))
local status = redis.call('HGET', meta, 'status') or 'missing'
if status ~= 'running' then return {status, '', 0} end
if redis.call('SADD', runkey(run, 'done'), tid) == 0 then return {status, '', 1} end
if ARGV[7] ~= tid then redis.call('HINCRBY', meta, 'duplicates_won', 1) end
local stored = ARGV[4] == '1'
if stored then redis.call('HSET', runkey(run, 'out'), tid, ARGV[5]) end
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
  i = i + 5
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
    if worker == '' or worker == '@' then
      if me == '' and continuation == '' then
        continuation = down
      elseif me == '' and worker == '@' then
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
  if #roots > 0 and redis.call('EXISTS', ARGV[8]) == 1 then
    redis.call('DEL', ARGV[8])
    redis.call('RPUSH', ARGV[8], cjson.encode({run = run, mem = my_mem, roots = roots,
                                                queued_at = now}))
  end
end
local reply = {status, continuation, 0}
for _, id in ipairs(local_ready) do table.insert(reply, id) end
return reply
"""
)

# ARGV: run, task id, record json, error json
FAIL = (
    _PRELUDE
    + r"""
local run, tid = ARGV[1], ARGV[2]
local meta = runkey(run, 'meta')
redis.call('HSET', histkey(run, 'tasks'), tid, ARGV[3])
redis.call('HINCRBY', meta, 'tasks_failed', 1)
local status = redis.call('HGET', meta, 'status')
if status == 'running' then
  redis.call('HSET', meta, 'status', 'failed', 'error', ARGV[4], 'failed_task', tid)
  stop_inboxes(run)
end
return status or 'missing'
"""
)

# ARGV: run, reason json, now. Records when the cancellation began (``cancelled_at``), so
# whoever ends the run after a grace period measures it from there, even after a restart.
CANCEL = (
    _PRELUDE
    + r"""
local run = ARGV[1]
local meta = runkey(run, 'meta')
local status = redis.call('HGET', meta, 'status')
if status == 'running' then
  redis.call('HSET', meta, 'status', 'cancelling', 'error', ARGV[2], 'cancelled_at', ARGV[3])
  stop_inboxes(run)
  return 1
end
return 0
"""
)

_FINALIZE = r"""
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
  redis.call('HSET', histkey(run, 'meta'), unpack(redis.call('HGETALL', meta)))
  local structure = redis.call('HGET', meta, 'structure_hash')
  local name = redis.call('HGET', meta, 'workflow')
  redis.call('HSET', 'dk:hist:structures', structure, name)
  local runs = 'dk:hist:s:' .. structure .. ':runs'
  redis.call('LPUSH', runs, run)
  while redis.call('LLEN', runs) > cap do
    local old = redis.call('RPOP', runs)
    redis.call('DEL', histkey(old, 'meta'), histkey(old, 'tasks'), histkey(old, 'workers'),
               histkey(old, 'plan'), histkey(old, 'edges'))
  end
  redis.call('LPUSH', 'dk:hist:wf:' .. name .. ':runs', run)
  redis.call('LTRIM', 'dk:hist:wf:' .. name .. ':runs', 0, 10 * cap - 1)
  redis.call('LPUSH', 'dk:hist:all', run)
  redis.call('LTRIM', 'dk:hist:all', 0, 9999)
  for _, part in ipairs({'meta', 'dag', 'plan', 'out', 'const', 'done', 'edges', 'depcount',
                        'started'}) do
    redis.call('EXPIRE', runkey(run, part), ttl)
  end
  for _, key in ipairs(redis.call('SMEMBERS', runkey(run, 'keys'))) do
    redis.call('EXPIRE', key, ttl)
  end
  redis.call('EXPIRE', runkey(run, 'keys'), ttl)
  redis.call('RPUSH', runkey(run, 'result'), status)
  redis.call('EXPIRE', runkey(run, 'result'), ttl)
  return status
end
"""

# ARGV: run, pool prefix, proc key, worker field, worker json, gb_s, cpu_alloc_s, cpu_used_s,
#       cold 0/1, now, ttl, history cap, next queue ("" = do not take more work), pre-warmed 0/1,
#       n amendments, [task id, record json]*n
# Returns {finalized 0/1, status of this run, next invocation or "", status of its run}
FINISH = (
    _PRELUDE
    + _FINALIZE
    + r"""
local run, pool, proc = ARGV[1], ARGV[2], ARGV[3]
local now, ttl, cap = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local meta = runkey(run, 'meta')
redis.call('HSET', histkey(run, 'workers'), ARGV[4], ARGV[5])
local i = 16
for _ = 1, tonumber(ARGV[15]) do
  redis.call('HSET', histkey(run, 'tasks'), ARGV[i], ARGV[i + 1])
  i = i + 2
end
-- Still held (not re-queued by the scaler meanwhile): then this invocation ends here. A
-- re-queued one is counted when its copy finishes, never twice.
local owned = redis.call('DEL', proc)
local finalized, status = 0, redis.call('HGET', meta, 'status')
if status then
  redis.call('HINCRBYFLOAT', meta, 'gb_s', ARGV[6])
  redis.call('HINCRBYFLOAT', meta, 'cpu_s_allocated', ARGV[7])
  redis.call('HINCRBYFLOAT', meta, 'cpu_s_used', ARGV[8])
  if ARGV[9] == '1' then
    redis.call('HINCRBY', meta, 'workers_cold', 1)
  else
    redis.call('HINCRBY', meta, 'workers_warm', 1)
  end
  if ARGV[14] == '1' then redis.call('HINCRBY', meta, 'workers_prewarmed', 1) end
  -- the run's peak memory: the highest of its workers' (each the highest of its tasks')
  local peak = tonumber(cjson.decode(ARGV[5]).peak_memory_bytes)
  if peak and peak > tonumber(redis.call('HGET', meta, 'peak_memory_bytes') or '0') then
    redis.call('HSET', meta, 'peak_memory_bytes', peak)
  end
  local active = 1
  if owned == 1 then active = redis.call('HINCRBY', meta, 'active', -1) end
  if active <= 0 and redis.call('EXISTS', runkey(run, 'result')) == 0 then
    status = finalize(run, now, ttl, cap)
    finalized = 1
  end
end
local nxt, nxt_status = '', ''
if ARGV[13] ~= '' then
  nxt = redis.call('LMOVE', ARGV[13], proc, 'LEFT', 'RIGHT') or ''
  if nxt ~= '' then
    nxt_status = redis.call('HGET', runkey(cjson.decode(nxt).run, 'meta'), 'status') or 'missing'
  end
end
return {finalized, status or 'missing', nxt, nxt_status}
"""
)

# ARGV: pool prefix, proc key, worker id, now, memory mib, spawned_at, oom-killed 0/1, peak
#       memory bytes ("" unknown), exit code ("" unknown), max re-queues
# Re-queues a dead worker's held work at the head of a class queue and records the loss. The
# task it was running is read from the worker's ``task`` key. Killed for memory: the work goes
# one class up (the run's ``classes``), the attempt travelling with the invocation
# (``escalations``) so the task's record keeps it; at the largest class, the run fails. Lost
# for another reason: re-queued at most ``max re-queues`` times, then the run fails (a poison
# task must not loop). Returns the number of invocations re-queued.
REQUEUE = (
    _PRELUDE
    + _FINALIZE
    + r"""
local pool, proc, wid, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local mem, spawned = tonumber(ARGV[5]), tonumber(ARGV[6])
local oom, peak, code = ARGV[7] == '1', tonumber(ARGV[8]), tonumber(ARGV[9])
local max_requeues = tonumber(ARGV[10])
local current = redis.call('GET', 'dk:w:' .. wid .. ':task')
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
  redis.call('HSET', histkey(inv.run, 'workers'), wid .. ':lost', cjson.encode({
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
  if oom then
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
    -- counted per task (a long-lived bound invocation may lose workers on several tasks)
    local counts = type(inv.requeues) == 'table' and inv.requeues or {}
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
redis.call('DEL', proc, 'dk:w:' .. wid .. ':hb', 'dk:w:' .. wid .. ':task')
redis.call('HDEL', pool .. ':workers', wid)
redis.call('SREM', pool .. ':idle:' .. mem, wid)
redis.call('SREM', pool .. ':waiting', wid)
if requeued > 0 then wake(pool) end
return requeued
"""
)

# ARGV: run, now. Ends a run without its workers (runtime closed mid-run, or a cancelled run
# whose workers did not stop in time): status cancelled, history written, keys expiring, and
# its invocations still queued in its pool dropped, so that no worker starts them after the
# end. A run that already ended is left as it is.
FORCE_END = (
    _PRELUDE
    + _FINALIZE
    + r"""
local run, now = ARGV[1], tonumber(ARGV[2])
local meta = runkey(run, 'meta')
if redis.call('EXISTS', runkey(run, 'result')) == 1 or redis.call('EXISTS', meta) == 0 then
  return ''
end
if redis.call('HGET', meta, 'status') == 'running' then
  redis.call('HSET', meta, 'status', 'cancelling')
end
local pool = redis.call('HGET', meta, 'pool')
if pool then
  pool = 'dk:pool:' .. pool
  for _, mem in ipairs(redis.call('SMEMBERS', pool .. ':classes')) do
    local queue = pool .. ':q:' .. mem
    for _, item in ipairs(redis.call('LRANGE', queue, 0, -1)) do
      if cjson.decode(item).run == run then redis.call('LREM', queue, 0, item) end
    end
  end
end
local ttl = tonumber(redis.call('HGET', meta, 'ttl_s') or '3600')
local cap = tonumber(redis.call('HGET', meta, 'history_cap') or '100')
return finalize(run, now, ttl, cap)
"""
)

# ARGV: run, [field, increment]*. Adds to a run's counters: its live meta while it runs, its
# history once it ended (e.g. a pre-warm counted by the scaler after a short run finished).
ADD_TO_RUN = (
    _PRELUDE
    + r"""
local run = ARGV[1]
local meta = runkey(run, 'meta')
if redis.call('EXISTS', runkey(run, 'result')) == 1 or redis.call('EXISTS', meta) == 0 then
  meta = histkey(run, 'meta')
  if redis.call('EXISTS', meta) == 0 then return 0 end
end
for i = 2, #ARGV, 2 do redis.call('HINCRBYFLOAT', meta, ARGV[i], ARGV[i + 1]) end
return 1
"""
)
