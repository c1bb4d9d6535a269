"""Lua scripts: each state transition of a run is one atomic step in Redis.

A worker that dies between two scripts leaves a consistent state: its unfinished work is still
in its ``proc`` list (re-queued by the scaler), completed tasks are in the run's ``done`` set,
and dependency counting is guarded per (upstream, downstream) edge, so re-running a task
cannot over-count. Key names are derived inside the scripts from the run id and must match
:mod:`dagkube.runtime.keys` (standalone Redis; see docs/architecture.md), namespace included:
every key a script touches for a run of namespace N lies under ``dk:ns:N:``, so a worker whose
Redis user may touch only those keys can run every script it calls (a key outside them would
fail the script half-way with NOPERM).
"""

from __future__ import annotations

# History limits (docs/architecture.md, "History"): runs kept per structure come with each run
# (``history_cap``); these two bound the number of structures and how long an unused one stays.
# A run's meta may carry its own (``history_structures``, ``history_retention_s``).
DEFAULT_HISTORY_STRUCTURES = 1000  # the most recently used structures kept
DEFAULT_HISTORY_RETENTION_S = 90 * 86400  # a structure not run for this long is dropped
# Redis expires history keys this long after the retention if no run ends meanwhile (a run
# that ends drops expired structures itself, index entries included).
HISTORY_EXPIRY_GRACE_S = 86400
HISTORY_EVICT_BATCH = 8  # structures one finalize drops at most (the rest: the next ones)

# Shared Lua helpers: key builders mirroring keys.py.
_PRELUDE = r"""
-- keys.key_root(keys.namespace_of(id)): an id '<namespace>.<rest>' keeps its keys under
-- dk:ns:<namespace>:, any other under dk:
local function root(id)
  local namespace = string.match(id, '^([^.]+)%.')
  if namespace then return 'dk:ns:' .. namespace .. ':' end
  return 'dk:'
end
local function runkey(run, part) return root(run) .. 'run:' .. run .. ':' .. part end
local function histkey(run, part) return root(run) .. 'hist:r:' .. run .. ':' .. part end
-- A record written into a run's history: while the run is live, or into its history once
-- written (a worker finishing after the end), expiring with it. Never into a history that was
-- dropped: that would re-create a key no index names and no TTL ends.
local function hist_hset(run, part, field, value)
  local ttl = redis.call('PTTL', histkey(run, 'meta'))  -- -2: no history (yet, or any more)
  if ttl == -2 and (redis.call('EXISTS', runkey(run, 'meta')) == 0
      or redis.call('EXISTS', runkey(run, 'result')) == 1) then
    return
  end
  redis.call('HSET', histkey(run, part), field, value)
  if ttl > 0 then redis.call('PEXPIRE', histkey(run, part), ttl) end
end
local function wake(pool)
  redis.call('LPUSH', pool .. ':wake', '1')
  redis.call('LTRIM', pool .. ':wake', 0, 0)
end
local function queue_invocation(pool, inv)
  redis.call('RPUSH', pool .. ':q:' .. inv.mem, cjson.encode(inv))
  redis.call('SADD', pool .. ':classes', inv.mem)
end
-- Every key of a run: its fixed parts, those listed in its key set, and the set itself.
local function expire_run(run, ttl)
  for _, part in ipairs({'meta', 'dag', 'plan', 'out', 'const', 'done', 'edges', 'depcount',
                        'started', 'keys', 'result'}) do
    redis.call('EXPIRE', runkey(run, part), ttl)
  end
  for _, key in ipairs(redis.call('SMEMBERS', runkey(run, 'keys'))) do
    redis.call('EXPIRE', key, ttl)
  end
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
hist_hset(run, 'tasks', ARGV[7], ARGV[6])
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
hist_hset(run, 'tasks', tid, ARGV[3])
redis.call('HINCRBY', meta, 'tasks_failed', 1)
local status = redis.call('HGET', meta, 'status')
if status == 'running' then
  redis.call('HSET', meta, 'status', 'failed', 'error', ARGV[4], 'failed_task', tid)
  stop_inboxes(run)
end
return status or 'missing'
"""
)

# ARGV: run, shortest lease. The lease of a live run: its keys, and the history it has written
# so far, expire one run TTL (``ttl_s``, at least the shortest lease) after the last renewal.
# Whoever waits for the run renews it (the local driver, the operator); a run nobody waits
# for any more (its driver was killed) goes away instead of staying forever. Returns 0 for a
# run that ended (finalize set its TTLs).
RENEW = (
    _PRELUDE
    + r"""
local run = ARGV[1]
local meta = runkey(run, 'meta')
local status = redis.call('HGET', meta, 'status')
if status ~= 'running' and status ~= 'cancelling' then return 0 end
local ttl = math.max(tonumber(redis.call('HGET', meta, 'ttl_s') or '3600'), tonumber(ARGV[2]))
expire_run(run, ttl)
for _, part in ipairs({'plan', 'edges', 'tasks', 'workers'}) do
  redis.call('EXPIRE', histkey(run, part), ttl)
end
return 1
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

# The history's keys and limits (keys.py: hist_run, hist_structure_runs, hist_all_runs, ...):
# writing a run's records at its end, and dropping runs and structures, always with the index
# entries naming them and all five record keys of a run together. Each namespace has its own
# history (its indexes under its root; ``H`` below holds their names), so a run's end never
# reads or drops another namespace's records.
_HISTORY = (
    f"""
local DEFAULT_RETENTION_S = {DEFAULT_HISTORY_RETENTION_S}
local DEFAULT_STRUCTURES = {DEFAULT_HISTORY_STRUCTURES}
local EXPIRY_GRACE_S, EVICT_BATCH = {HISTORY_EXPIRY_GRACE_S}, {HISTORY_EVICT_BATCH}
"""
    + r"""
local HIST_PARTS = {'meta', 'tasks', 'workers', 'plan', 'edges'}
local function history_keys(key_root)
  local h = key_root .. 'hist:'
  return {all = h .. 'all', structures = h .. 'structures', used = h .. 'used', prefix = h}
end
local function structure_runs(H, structure) return H.prefix .. 's:' .. structure .. ':runs' end
local function workflow_runs(H, name) return H.prefix .. 'wf:' .. name .. ':runs' end

-- Removes the ids in ``gone`` (a set of ``count`` ids) from an index list: one LREM each for a
-- few; else one pass rewriting the list, as each LREM reads the whole list.
local function unindex(key, gone, count)
  if count <= 4 then
    for id in pairs(gone) do redis.call('LREM', key, 0, id) end
    return
  end
  local kept, changed = {}, false
  for _, id in ipairs(redis.call('LRANGE', key, 0, -1)) do
    if gone[id] then changed = true else table.insert(kept, id) end
  end
  if not changed then return end
  local ttl = redis.call('PTTL', key)
  redis.call('DEL', key)
  for i = 1, #kept, 1000 do
    redis.call('RPUSH', key, unpack(kept, i, math.min(i + 999, #kept)))
  end
  if ttl > 0 and #kept > 0 then redis.call('PEXPIRE', key, ttl) end
end

-- Everything these runs left in the history and every index entry naming them, in one step.
-- ``indexes``: lists that may name them besides those their records name.
local function drop_runs(H, ids, indexes)
  if #ids == 0 then return end
  local lists, listed, gone = {}, {}, {}
  local function index(key)
    if not listed[key] then listed[key] = true; table.insert(lists, key) end
  end
  index(H.all)
  for _, key in ipairs(indexes) do index(key) end
  for _, id in ipairs(ids) do
    gone[id] = true
    local found = redis.call('HMGET', histkey(id, 'meta'), 'structure_hash', 'workflow')
    if found[1] then index(structure_runs(H, found[1])) end
    if found[2] then index(workflow_runs(H, found[2])) end
    for _, part in ipairs(HIST_PARTS) do redis.call('DEL', histkey(id, part)) end
  end
  for _, key in ipairs(lists) do unindex(key, gone, #ids) end
end

local function drop_structure(H, structure)
  local runs = structure_runs(H, structure)
  local name = redis.call('HGET', H.structures, structure)
  local indexes = {runs}
  if name then table.insert(indexes, workflow_runs(H, name)) end
  drop_runs(H, redis.call('LRANGE', runs, 0, -1), indexes)
  redis.call('DEL', runs)
  redis.call('HDEL', H.structures, structure)
  redis.call('ZREM', H.used, structure)
end

-- Structures recorded before the used set existed join it, as last used when their newest run
-- ended, so that the caps apply to them too.
local function adopt_structures(H)
  if redis.call('HLEN', H.structures) <= redis.call('ZCARD', H.used) then return end
  for _, structure in ipairs(redis.call('HKEYS', H.structures)) do
    if not redis.call('ZSCORE', H.used, structure) then
      local newest = redis.call('LINDEX', structure_runs(H, structure), 0)
      local at = newest and redis.call('HGET', histkey(newest, 'meta'), 'finished_at')
      redis.call('ZADD', H.used, tonumber(at or '') or 0, structure)
    end
  end
end

-- A run's end in its history: its records and index entries; its structure's runs beyond
-- ``cap`` dropped; its structure's records kept for the retention from now; then the least
-- recently used structures beyond the cap, and those unused for the retention, dropped.
local function record_history(run, meta, now, cap)
  local H = history_keys(root(run))
  local retention = tonumber(redis.call('HGET', meta, 'history_retention_s') or '')
    or DEFAULT_RETENTION_S
  local max_structures = tonumber(redis.call('HGET', meta, 'history_structures') or '')
    or DEFAULT_STRUCTURES
  local keep_s = math.floor(retention + EXPIRY_GRACE_S)
  redis.call('HSET', histkey(run, 'meta'), unpack(redis.call('HGETALL', meta)))
  local structure = redis.call('HGET', meta, 'structure_hash')
  local name = redis.call('HGET', meta, 'workflow')
  adopt_structures(H)
  redis.call('HSET', H.structures, structure, name)
  redis.call('ZADD', H.used, now, structure)
  local runs, named = structure_runs(H, structure), workflow_runs(H, name)
  redis.call('LPUSH', runs, run)
  redis.call('LPUSH', named, run)
  redis.call('LTRIM', named, 0, 10 * cap - 1)
  redis.call('LPUSH', H.all, run)
  redis.call('LTRIM', H.all, 0, 9999)
  drop_runs(H, redis.call('LRANGE', runs, cap, -1), {runs})
  for _, id in ipairs(redis.call('LRANGE', runs, 0, -1)) do
    for _, part in ipairs(HIST_PARTS) do redis.call('EXPIRE', histkey(id, part), keep_s) end
  end
  for _, key in ipairs({runs, named, H.all, H.structures, H.used}) do
    redis.call('EXPIRE', key, keep_s)
  end
  for _ = 1, EVICT_BATCH do
    local oldest = redis.call('ZRANGE', H.used, 0, 0, 'WITHSCORES')
    if #oldest == 0 or oldest[1] == structure then break end
    if redis.call('ZCARD', H.used) <= max_structures
        and tonumber(oldest[2]) >= now - retention then
      break
    end
    drop_structure(H, oldest[1])
  end
end
"""
)

_FINALIZE = (
    _HISTORY
    + r"""
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
"""
)

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
hist_hset(run, 'workers', ARGV[4], ARGV[5])
local i = 16
for _ = 1, tonumber(ARGV[15]) do
  hist_hset(run, 'tasks', ARGV[i], ARGV[i + 1])
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
-- the worker's keys share its pool's root (keys.worker_task, worker_heartbeat)
local worker_root = string.match(pool, '^(.-)pool:') .. 'w:' .. wid
local task_key, beat_key = worker_root .. ':task', worker_root .. ':hb'
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
    -- since the run last made progress: losses between which tasks completed are no crash loop
    local counts = type(inv.requeues) == 'table' and inv.requeues or {}
    local done = exists and tonumber(redis.call('HGET', meta, 'tasks_done') or '0') or 0
    if done > (tonumber(inv.done_at_loss) or done) then counts = {} end
    inv.done_at_loss = done
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
  pool = root(pool) .. 'pool:' .. pool
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

# ARGV: structure hash, runs to keep ("" = any number), finished before (Unix seconds, "" = any
#       time), dry run 0/1, workflow ("" = any: a structure's runs may carry several names),
#       key root of the history's namespace (keys.key_root; absent: "dk:").
#       Drops (or, dry, lists) the structure's runs (of that workflow) beyond the newest
#       ``keep`` and those that finished before the time, with the entries of its index naming
#       a run whose records are gone; a structure left without runs is dropped. Returns JSON
#       {removed: [{run, workflow, status, finished_at}], missing: [run id], kept: n (of the
#       runs looked at), left: n (runs the structure keeps)}.
PRUNE_STRUCTURE = (
    _PRELUDE
    + _HISTORY
    + r"""
local structure, keep, before = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local workflow = ARGV[5]
local H = history_keys(ARGV[6] or 'dk:')
local runs = structure_runs(H, structure)
local removed, doomed, missing, kept, left = {}, {}, {}, 0, 0
for _, id in ipairs(redis.call('LRANGE', runs, 0, -1)) do
  local m = redis.call('HMGET', histkey(id, 'meta'), 'workflow', 'status', 'finished_at',
                       'submitted_at')
  if redis.call('EXISTS', histkey(id, 'meta')) == 0 then
    table.insert(missing, id)
    table.insert(doomed, id)
  elseif workflow ~= '' and m[1] ~= workflow then
    left = left + 1
  else
    local at = tonumber(m[3] or '') or tonumber(m[4] or '') or 0
    if (keep and kept >= keep) or (before and at < before) then
      table.insert(removed, {run = id, workflow = m[1] or '', status = m[2] or '',
                             finished_at = at})
      table.insert(doomed, id)
    else
      kept = kept + 1
      left = left + 1
    end
  end
end
if ARGV[4] ~= '1' then
  local name = redis.call('HGET', H.structures, structure)
  local indexes = {runs}
  if name then table.insert(indexes, workflow_runs(H, name)) end
  drop_runs(H, doomed, indexes)
  if redis.call('EXISTS', runs) == 0 then
    redis.call('HDEL', H.structures, structure)
    redis.call('ZREM', H.used, structure)
  end
end
return cjson.encode({removed = removed, missing = missing, kept = kept, left = left})
"""
)

# KEYS: index lists; ARGV: dry run 0/1. Removes (or, dry, lists) the entries naming a run
# whose records are gone (e.g. expired while no run ended). Returns those runs' ids.
PRUNE_INDEXES = (
    _PRELUDE
    + _HISTORY
    + r"""
local missing = {}
for _, key in ipairs(KEYS) do
  local gone, count = {}, 0
  for _, id in ipairs(redis.call('LRANGE', key, 0, -1)) do
    if not gone[id] and redis.call('EXISTS', histkey(id, 'meta')) == 0 then
      gone[id] = true
      count = count + 1
      table.insert(missing, id)
    end
  end
  if ARGV[1] ~= '1' and count > 0 then unindex(key, gone, count) end
end
return missing
"""
)
