-- RENEW (calls.RenewCall): the lease of a live run. Its keys, and the history it has written
-- so far, expire one run TTL (ttl_s, at least the shortest lease) after the last renewal.
-- Whoever waits for the run renews it (the local driver, the operator); a run nobody waits
-- for any more (its driver was killed) goes away instead of staying forever. Returns 0 for a
-- run that ended (finalize set its TTLs).
local run, shortest = ARGV[5], tonumber(ARGV[6])
local meta = runkey(run, 'meta')
local status = redis.call('HGET', meta, 'status')
if status ~= 'running' and status ~= 'cancelling' then return 0 end
local ttl = math.max(tonumber(redis.call('HGET', meta, 'ttl_s') or '3600'), shortest)
expire_run(run, ttl)
for _, part in ipairs({'plan', 'edges', 'tasks', 'workers'}) do
  redis.call('EXPIRE', histkey(run, part), ttl)
end
return 1
