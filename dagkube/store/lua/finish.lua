-- FINISH (calls.FinishCall): an invocation ends on its worker: the worker's record, the time
-- it is charged, and the run's end when this was its last invocation; then the next queued
-- invocation of the worker's class, taken in the same step.
local run, pool, proc = ARGV[5], ARGV[6], ARGV[7]
local worker_field, worker_record = ARGV[8], ARGV[9]
local gb_s, cpu_allocated_s, cpu_used_s = ARGV[10], ARGV[11], ARGV[12]
local cold, now, ttl, cap = ARGV[13] == '1', tonumber(ARGV[14]), tonumber(ARGV[15]),
  tonumber(ARGV[16])
local next_queue, prewarmed = ARGV[17], ARGV[18] == '1'
local meta = runkey(run, 'meta')
hist_hset(run, 'workers', worker_field, worker_record)
local i = 20
for _ = 1, tonumber(ARGV[19]) do
  hist_hset(run, 'tasks', ARGV[i], ARGV[i + 1])
  i = i + 2
end
-- Still held (not re-queued by the scaler meanwhile): then this invocation ends here. A
-- re-queued one is counted when its copy finishes, never twice.
local owned = redis.call('DEL', proc)
local finalized, status = 0, redis.call('HGET', meta, 'status')
if status then
  redis.call('HINCRBYFLOAT', meta, 'gb_s', gb_s)
  redis.call('HINCRBYFLOAT', meta, 'cpu_s_allocated', cpu_allocated_s)
  redis.call('HINCRBYFLOAT', meta, 'cpu_s_used', cpu_used_s)
  if cold then
    redis.call('HINCRBY', meta, 'workers_cold', 1)
  else
    redis.call('HINCRBY', meta, 'workers_warm', 1)
  end
  if prewarmed then redis.call('HINCRBY', meta, 'workers_prewarmed', 1) end
  -- the run's peak memory: the highest of its workers' (each the highest of its tasks')
  local peak = tonumber(cjson.decode(worker_record).peak_memory_bytes)
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
if next_queue ~= '' then
  nxt = redis.call('LMOVE', next_queue, proc, 'LEFT', 'RIGHT') or ''
  if nxt ~= '' then
    nxt_status = redis.call('HGET', runkey(cjson.decode(nxt).run, 'meta'), 'status') or 'missing'
  end
end
return {finalized, status or 'missing', nxt, nxt_status}
