-- LENGTHS (calls.LengthsCall): the lengths of hash fields, KEYS[i]'s field ARGV[4 + i] (0:
-- absent), so that a reader can fetch large values a few at a time. One command for any
-- number of fields.
local lengths = {}
for i, key in ipairs(KEYS) do
  lengths[i] = redis.call('HSTRLEN', key, ARGV[4 + i])
end
return lengths
