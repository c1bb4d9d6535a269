-- PRUNE_STRUCTURE (calls.PruneStructureCall): drops (or, dry, lists) a structure's runs (of
-- one workflow, or any) beyond the newest ``keep`` and those that finished before a time,
-- with the entries of its index naming a run whose records are gone; a structure left
-- without runs is dropped. Returns JSON {removed: [{run, workflow, status, finished_at}],
-- missing: [run id], kept: n (of the runs looked at), left: n (runs the structure keeps)}.
local structure, keep, before = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local dry_run, workflow = ARGV[8] == '1', ARGV[9]
local runs = structure_runs(structure)
local removed, doomed, missing, kept, left = {}, {}, {}, 0, 0
for _, id in ipairs(redis.call('LRANGE', runs, 0, -1)) do
  local m = redis.call('HMGET', histkey(id, 'meta'), 'workflow', 'status', 'finished_at',
                       'submitted_at')
  if redis.call('EXISTS', histkey(id, 'meta')) == 0 then
    table.insert(missing, id)
    table.insert(doomed, id)
  elseif workflow ~= '' and m[1] ~= workflow then
    left = left + 1
  else
    local at = tonumber(m[3] or '') or tonumber(m[4] or '') or 0
    if (keep and kept >= keep) or (before and at < before) then
      table.insert(removed, {run = id, workflow = m[1] or '', status = m[2] or '',
                             finished_at = at})
      table.insert(doomed, id)
    else
      kept = kept + 1
      left = left + 1
    end
  end
end
if not dry_run then
  local name = redis.call('HGET', H.structures, structure)
  local indexes = {runs}
  if name then table.insert(indexes, workflow_runs(name)) end
  drop_runs(doomed, indexes)
  if redis.call('EXISTS', runs) == 0 then
    redis.call('HDEL', H.structures, structure)
    redis.call('ZREM', H.used, structure)
  end
end
return cjson.encode({removed = removed, missing = missing, kept = kept, left = left})
