-- The history's keys and limits (keys.py: hist_run, hist_structure_runs, hist_all_runs, ...):
-- writing a run's records at its end, and dropping runs and structures, always with the index
-- entries naming them and all five record keys of a run together. Each namespace has its own
-- history (HISTORY, HISTORY_RUNS: the call's namespace), so a run's end never reads or drops
-- another namespace's records. DEFAULT_RETENTION_S, DEFAULT_STRUCTURES, EXPIRY_GRACE_S and
-- EVICT_BATCH come from scripts.py.
local HIST_PARTS = {'meta', 'tasks', 'workers', 'plan', 'edges'}
local H = {all = HISTORY .. 'all', structures = HISTORY .. 'structures', used = HISTORY .. 'used'}
local function structure_runs(structure) return HISTORY .. 's:' .. structure .. ':runs' end
local function workflow_runs(name) return HISTORY .. 'wf:' .. name .. ':runs' end

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
local function drop_runs(ids, indexes)
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
    if found[1] then index(structure_runs(found[1])) end
    if found[2] then index(workflow_runs(found[2])) end
    for _, part in ipairs(HIST_PARTS) do redis.call('DEL', histkey(id, part)) end
  end
  for _, key in ipairs(lists) do unindex(key, gone, #ids) end
end

local function drop_structure(structure)
  local runs = structure_runs(structure)
  local name = redis.call('HGET', H.structures, structure)
  local indexes = {runs}
  if name then table.insert(indexes, workflow_runs(name)) end
  drop_runs(redis.call('LRANGE', runs, 0, -1), indexes)
  redis.call('DEL', runs)
  redis.call('HDEL', H.structures, structure)
  redis.call('ZREM', H.used, structure)
end

-- Structures recorded before the used set existed join it, as last used when their newest run
-- ended, so that the caps apply to them too.
local function adopt_structures()
  if redis.call('HLEN', H.structures) <= redis.call('ZCARD', H.used) then return end
  for _, structure in ipairs(redis.call('HKEYS', H.structures)) do
    if not redis.call('ZSCORE', H.used, structure) then
      local newest = redis.call('LINDEX', structure_runs(structure), 0)
      local at = newest and redis.call('HGET', histkey(newest, 'meta'), 'finished_at')
      redis.call('ZADD', H.used, tonumber(at or '') or 0, structure)
    end
  end
end

-- A run's end in its history: its records and index entries; its structure's runs beyond
-- ``cap`` dropped; its structure's records kept for the retention from now; then the least
-- recently used structures beyond the cap, and those unused for the retention, dropped.
local function record_history(run, meta, now, cap)
  local retention = tonumber(redis.call('HGET', meta, 'history_retention_s') or '')
    or DEFAULT_RETENTION_S
  local max_structures = tonumber(redis.call('HGET', meta, 'history_structures') or '')
    or DEFAULT_STRUCTURES
  local keep_s = math.floor(retention + EXPIRY_GRACE_S)
  redis.call('HSET', histkey(run, 'meta'), unpack(redis.call('HGETALL', meta)))
  local structure = redis.call('HGET', meta, 'structure_hash')
  local name = redis.call('HGET', meta, 'workflow')
  adopt_structures()
  redis.call('HSET', H.structures, structure, name)
  redis.call('ZADD', H.used, now, structure)
  local runs, named = structure_runs(structure), workflow_runs(name)
  redis.call('LPUSH', runs, run)
  redis.call('LPUSH', named, run)
  redis.call('LTRIM', named, 0, 10 * cap - 1)
  redis.call('LPUSH', H.all, run)
  redis.call('LTRIM', H.all, 0, 9999)
  drop_runs(redis.call('LRANGE', runs, cap, -1), {runs})
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
    drop_structure(oldest[1])
  end
end
