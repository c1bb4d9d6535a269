-- STORE (calls.StoreCall): outputs stored outside a completion (one kept for a later fan-in,
-- upstreams re-run from their lineage). ARGV[6] small ones follow as (task id, output) pairs,
-- fields of the run's output hash; then the task ids of the large ones, written under their
-- own keys by the caller just before this call and taken up here (adopt_output). Nothing is
-- kept for a run whose keys are gone. The run's meta counts them (``outputs_stored``): the
-- REQUEUE script takes them for progress. Returns the run's status ('missing': gone).
local run, n_inline = ARGV[5], tonumber(ARGV[6])
local meta, out = runkey(run, 'meta'), runkey(run, 'out')
local ttl = redis.call('PTTL', meta)
local i = 7
for _ = 1, n_inline do
  if ttl ~= -2 then redis.call('HSET', out, ARGV[i], ARGV[i + 1]) end
  i = i + 2
end
-- an ended run's outputs expire with it (a hash its driver dropped is made anew here)
if ttl > 0 and n_inline > 0 then redis.call('PEXPIRE', out, ttl) end
for j = i, #ARGV do adopt_output(run, own_key(out, ARGV[j])) end
if ttl ~= -2 then redis.call('HINCRBY', meta, 'outputs_stored', n_inline + #ARGV - i + 1) end
return redis.call('HGET', meta, 'status') or 'missing'
