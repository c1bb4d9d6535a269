-- CANCEL (calls.CancelCall): records when the cancellation began (cancelled_at), so whoever
-- ends the run after a grace period measures it from there, even after a restart.
local run, reason, now = ARGV[5], ARGV[6], ARGV[7]
local meta = runkey(run, 'meta')
local status = redis.call('HGET', meta, 'status')
if status == 'running' then
  redis.call('HSET', meta, 'status', 'cancelling', 'error', reason, 'cancelled_at', now)
  stop_inboxes(run)
  return 1
end
return 0
