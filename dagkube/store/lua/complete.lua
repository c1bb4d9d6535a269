-- COMPLETE (calls.CompleteCall): one or more tasks' outputs and records, and their downstream
-- tasks made ready. A bound worker whose tasks end faster than a COMPLETE's round trip sends
-- the ones that ended meanwhile in one call (its group commit), in the order they ran.
-- A flexible worker's proc list is rewritten to hold what it still has to run
-- (continuation, clustered children, pending roots), so a lost worker's remaining work is
-- re-queued.
-- Each task's output: 'none' (not stored), 'inline' (small: a field of the run's output
-- hash, stored here), or 'apart' (large: written under its own key by the caller just before
-- this call, never copied through Lua, and taken up here: adopt_output).
-- ARGV[11]: the claim of the worker's next task ('' none), written to its task key if the
-- run goes on, with a TTL of ARGV[12].
-- Work stealing (steal.lua): a ready consumer that may run on another bound worker is also
-- appended to its worker's offers list; a task its planned worker offered is withdrawn when
-- that worker completes it; a bound worker's reply lists the tasks others took from it.
local run, pool, proc, task_key = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local me, my_mem = ARGV[9], tonumber(ARGV[10])
local next_claim, claim_ttl = ARGV[11], tonumber(ARGV[12])
local meta = runkey(run, 'meta')
-- ARGV[13]: the rest, as fields (calls.netstrings): amended records, pending roots, tasks
local body = fields(ARGV[13])
local i = 2
for _ = 1, tonumber(body[1]) do
  hist_hset(run, 'tasks', body[i], body[i + 1])
  i = i + 2
end
local pending = {}
local n_pending = tonumber(body[i])
i = i + 1
for _ = 1, n_pending do
  table.insert(pending, body[i])
  i = i + 1
end
-- the tasks, each {tid, mode, inline output, record field, now, consumers (JSON), offered};
-- body[i + 1..] of each: tid, mode, output, record, record field, now, offered, consumers: a
-- JSON array of seven values a consumer (calls.encode_consumers)
local tasks = {}
for _ = 1, tonumber(body[i]) do
  table.insert(tasks, {body[i + 1], body[i + 2], body[i + 3], body[i + 5], tonumber(body[i + 6]),
                       body[i + 8], body[i + 7] == '1'})
  hist_hset(run, 'tasks', body[i + 5], body[i + 4])
  i = i + 8
end
-- the worker runs no task now (its task key is what a lost worker is charged with)
redis.call('DEL', task_key)
for _, task in ipairs(tasks) do
  if task[2] == 'apart' then adopt_output(run, own_key(runkey(run, 'out'), task[1])) end
end
local status = redis.call('HGET', meta, 'status') or 'missing'
if status ~= 'running' then return {status, '', 0} end
-- a bound worker's next task, ready now: what it runs from here (its claim)
if next_claim ~= '' then redis.call('SET', task_key, next_claim, 'EX', claim_ttl) end
local total = tonumber(redis.call('HGET', meta, 'tasks_total'))
local continuation = ''
local local_ready = {}
-- Appends to inboxes and offers lists, made once per list for each task's consumers (a
-- fan-out's source readies 1,000 of them: one RPUSH each cost a millisecond a 500); each
-- list is named in the run's key set once a call
local appends, listed = {}, {}
local function append(list, tid)
  local values = appends[list]
  if values == nil then
    values = {}
    appends[list] = values
    if not listed[list] then
      listed[list] = true
      redis.call('SADD', runkey(run, 'keys'), list)
    end
  end
  table.insert(values, tid)
end
local function flush_appends()
  for list, values in pairs(appends) do
    for first = 1, #values, 1000 do
      redis.call('RPUSH', list, unpack(values, first, math.min(first + 999, #values)))
    end
  end
  appends = {}
end
local function offer(worker, tid) append(runkey(run, 'offers:' .. worker), tid) end
local claimed = {}  -- bound workers whose claim this call tried (SET NX: one invocation a run)
local queued = 0
local duplicate = 0
local now = 0
for _, task in ipairs(tasks) do
  local tid, output_mode, output, record_field = task[1], task[2], task[3], task[4]
  now = task[5]
  duplicate = 1 - redis.call('SADD', runkey(run, 'done'), tid)
  if task[7] then redis.call('LREM', runkey(run, 'offers:' .. me), 1, tid) end
  if duplicate == 0 then
    if record_field ~= tid then redis.call('HINCRBY', meta, 'duplicates_won', 1) end
    if output_mode == 'inline' then redis.call('HSET', runkey(run, 'out'), tid, output) end
    if redis.call('HINCRBY', meta, 'tasks_done', 1) >= total then
      -- every output exists now: the run's makespan ends here, even if a duplicated task's
      -- original still runs (its worker's time is charged when it finishes)
      local clock = redis.call('TIME')
      redis.call('HSET', meta, 'completed_at', tonumber(clock[1]) + tonumber(clock[2]) / 1e6)
    end
    local stored = output_mode ~= 'none'
    for _, consumer in ipairs(cjson.decode(task[6])) do
      local down, ndeps, worker, mem, host = unpack(consumer, 1, 5)
      local clustered, offers = consumer[6] == 1, consumer[7] == 1
      if stored and host ~= '' and host ~= me then
        local preload = runkey(run, 'preload:' .. host)
        redis.call('RPUSH', preload, tid)
        redis.call('SADD', runkey(run, 'keys'), preload)
      end
      -- counted once: only a task's first completion (done above) reaches its consumers
      if ndeps == 1 or redis.call('HINCRBY', runkey(run, 'depcount'), down, 1) == ndeps then
        -- dagkube.planning.rules.route, case for case (me: the producer's worker, '' flexible)
        if worker == '' then
          if me == '' and continuation == '' then
            continuation = down
          elseif me == '' and clustered then
            table.insert(local_ready, down)
          else
            queue_invocation(pool, {run = run, mem = mem, roots = {down}, queued_at = now})
            queued = queued + 1
          end
        elseif worker == me then
          table.insert(local_ready, down)
          if offers then offer(worker, down) end
        else
          if offers then offer(worker, down) end
          append(runkey(run, 'inbox:' .. worker), down)
          if not claimed[worker] then
            claimed[worker] = true
            local claim = runkey(run, 'claim:' .. worker)
            if redis.call('SET', claim, '1', 'NX') then
              redis.call('SADD', runkey(run, 'keys'), claim)
              queue_invocation(pool, {run = run, mem = mem, worker = worker, roots = {},
                                      queued_at = now})
              queued = queued + 1
            end
          end
        end
      end
    end
  end
  flush_appends()  -- before the next task's LREM of its offer
end
if queued > 0 then
  redis.call('HINCRBY', meta, 'active', queued)
  wake(pool)
end
if me == '' then
  local roots = {}
  if continuation ~= '' then table.insert(roots, continuation) end
  for _, id in ipairs(local_ready) do table.insert(roots, id) end
  for _, id in ipairs(pending) do table.insert(roots, id) end
  -- Only while this worker still holds the invocation: the scaler may have re-queued it
  -- (heartbeat expired), and then the re-queued copy owns what is left.
  if #roots > 0 and redis.call('EXISTS', proc) == 1 then
    redis.call('DEL', proc)
    redis.call('RPUSH', proc, cjson.encode({run = run, mem = my_mem, roots = roots,
                                            queued_at = now}))
  end
end
-- the reply: the run's status, the continuation, whether the last task was done already
-- (a duplicate's completion), how many ready consumers were routed to this worker, those,
-- then the tasks of this bound worker others took since its last COMPLETE
local reply = {status, continuation, duplicate, #local_ready}
for _, id in ipairs(local_ready) do table.insert(reply, id) end
if me ~= '' then
  local set = runkey(run, 'taken:' .. me)
  local taken = redis.call('SMEMBERS', set)
  if #taken > 0 then
    redis.call('DEL', set)
    for _, id in ipairs(taken) do table.insert(reply, id) end
  end
end
return reply
