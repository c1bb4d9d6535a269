-- STEAL (calls.StealCall): a bound worker with nothing left to run takes some of the ready
-- tasks other bound workers of its run offered (work stealing). A worker's offers list holds
-- its ready tasks that may run elsewhere, in the order it runs them (COMPLETE appends them as
-- they become ready and withdraws each one its worker completes); a thief takes from the end,
-- the tasks their worker would run last, from the longest lists first: half of each list
-- beyond the `keep` its worker may be running already (at least one), up to `max` in all.
-- Each task taken joins its worker's taken set, which its next COMPLETE reads: that worker
-- then skips the task if done, and runs it itself if not (the thief may have been lost).
-- Nothing is taken while the thief's own inbox holds tasks (they came before it asked).
local run, thief, max, keep = ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
if redis.call('HGET', runkey(run, 'meta'), 'status') ~= 'running' then return {} end
if redis.call('LLEN', runkey(run, 'inbox:' .. thief)) > 0 then return {} end
local done = runkey(run, 'done')
local lists = {}
for i = 9, #ARGV do
  local offers = runkey(run, 'offers:' .. ARGV[i])
  local n = redis.call('LLEN', offers)
  if n > keep then table.insert(lists, {ARGV[i], offers, n}) end
end
table.sort(lists, function(a, b) return a[3] > b[3] end)
local taken = {}
for _, found in ipairs(lists) do
  if #taken >= max then break end
  local victim, offers, n = found[1], found[2], found[3]
  local want = math.min(max - #taken, math.max(1, math.floor((n - keep) / 2)))
  local mine = {}
  while want > 0 do
    local tid = redis.call('RPOP', offers)
    if not tid then break end
    if redis.call('SISMEMBER', done, tid) == 0 then
      table.insert(mine, tid)
      want = want - 1
    end
  end
  if #mine > 0 then
    local set = runkey(run, 'taken:' .. victim)
    redis.call('SADD', set, unpack(mine))
    redis.call('SADD', runkey(run, 'keys'), set)
    for _, tid in ipairs(mine) do table.insert(taken, tid) end
  end
end
if #taken > 0 then redis.call('HINCRBY', runkey(run, 'meta'), 'tasks_stolen', #taken) end
return taken
