-- PRUNE_INDEXES (calls.PruneIndexesCall): removes (or, dry, lists) the entries of the index
-- lists in KEYS naming a run whose records are gone (e.g. expired while no run ended).
-- Returns those runs' ids.
local dry_run = ARGV[5] == '1'
local missing = {}
for _, key in ipairs(KEYS) do
  local gone, count = {}, 0
  for _, id in ipairs(redis.call('LRANGE', key, 0, -1)) do
    if not gone[id] and redis.call('EXISTS', histkey(id, 'meta')) == 0 then
      gone[id] = true
      count = count + 1
      table.insert(missing, id)
    end
  end
  if not dry_run and count > 0 then unindex(key, gone, count) end
end
return missing
