-- Shared by every script. The caller passes the prefixes of its namespace's key space as the
-- first four arguments (dagkube/store/keys.py, KeySpace): runs, history indexes, run
-- histories, pools. Keys are these prefixes followed by an id and a part name, so no key
-- name is spelled here, and every key a call touches lies under its namespace's root.
local RUNS, HISTORY, HISTORY_RUNS, POOLS = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local function runkey(run, part) return RUNS .. run .. ':' .. part end
local function histkey(run, part) return HISTORY_RUNS .. run .. ':' .. part end
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
-- calls.netstrings: fields in one argument, each its length in bytes, ':' and its bytes
local function fields(blob)
  local found, at = {}, 1
  while at <= #blob do
    local colon = string.find(blob, ':', at, true)
    local size = tonumber(string.sub(blob, at, colon - 1))
    found[#found + 1] = string.sub(blob, colon + 1, colon + size)
    at = colon + size + 1
  end
  return found
end
-- keys.own_key: a large value's own key, next to the hash it would otherwise be a field of.
local function own_key(hash, field) return hash .. ':' .. field end
-- A large output the caller wrote under its own key just before this script (SET NX with the
-- run's TTL, should no script ever take it up): while the run has keys, it becomes one of
-- them, listed in the run's key set (renewed, expiring or deleted with the others) with the
-- TTL its meta has now (a live run's lease, an ended run's expiry; none if the meta has
-- none); for a run whose keys are gone it is unlinked at once, as nothing else would remove
-- it before its TTL.
local function adopt_output(run, key)
  local ttl = redis.call('PTTL', runkey(run, 'meta'))
  if ttl == -2 then
    redis.call('UNLINK', key)
    return
  end
  redis.call('SADD', runkey(run, 'keys'), key)
  if ttl == -1 then redis.call('PERSIST', key) else redis.call('PEXPIRE', key, ttl) end
end
local function wake(pool)
  redis.call('LPUSH', pool .. ':wake', '1')
  redis.call('LTRIM', pool .. ':wake', 0, 0)
end
local function queue_invocation(pool, inv)
  redis.call('RPUSH', pool .. ':q:' .. inv.mem, cjson.encode(inv))
  redis.call('SADD', pool .. ':classes', inv.mem)
end
-- Every key of a run: its fixed parts (RUN_PARTS: keys.RUN_PARTS, set by scripts.py), those
-- listed in its key set, and the set itself.
local function expire_run(run, ttl)
  for _, part in ipairs(RUN_PARTS) do
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
