-- FORCE_END (calls.ForceEndCall): ends a run without its workers (runtime closed mid-run, or
-- a cancelled run whose workers did not stop in time): status cancelled, history written,
-- keys expiring, and its invocations still queued in its pool dropped, so that no worker
-- starts them after the end. A run that already ended is left as it is (returns '').
local run, now = ARGV[5], tonumber(ARGV[6])
local meta = runkey(run, 'meta')
if redis.call('EXISTS', runkey(run, 'result')) == 1 or redis.call('EXISTS', meta) == 0 then
  return ''
end
if redis.call('HGET', meta, 'status') == 'running' then
  redis.call('HSET', meta, 'status', 'cancelling')
end
local pool = redis.call('HGET', meta, 'pool')
if pool then
  pool = POOLS .. pool
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
