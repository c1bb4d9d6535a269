-- FAIL (calls.FailCall): a task failed after its retries; the run fails and its bound
-- workers are told to stop. Returns the run's status before.
local run, tid, record, error_json = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local meta = runkey(run, 'meta')
hist_hset(run, 'tasks', tid, record)
redis.call('HINCRBY', meta, 'tasks_failed', 1)
local status = redis.call('HGET', meta, 'status')
if status == 'running' then
  redis.call('HSET', meta, 'status', 'failed', 'error', error_json, 'failed_task', tid)
  stop_inboxes(run)
end
return status or 'missing'
