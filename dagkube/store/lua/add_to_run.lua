-- ADD_TO_RUN (calls.AddToRunCall): adds to a run's counters, [field, increment]* after the
-- run id: its live meta while it runs, its history once it ended (e.g. a pre-warm counted by
-- the scaler after a short run finished). Returns 0 when neither exists.
local run = ARGV[5]
local meta = runkey(run, 'meta')
if redis.call('EXISTS', runkey(run, 'result')) == 1 or redis.call('EXISTS', meta) == 0 then
  meta = histkey(run, 'meta')
  if redis.call('EXISTS', meta) == 0 then return 0 end
end
for i = 6, #ARGV, 2 do redis.call('HINCRBYFLOAT', meta, ARGV[i], ARGV[i + 1]) end
return 1
