-- LENGTHS (calls.LengthsCall): where and how long values are, so that a reader can fetch
-- large values a few at a time. For value i, KEYS[2i - 1] is its hash and ARGV[4 + i] its
-- field, KEYS[2i] its own key (keys.own_key: where a large value lives instead); the reply
-- has two numbers per value: its length (0: absent) and 1 if it lies under its own key.
-- One command for any number of values.
local reply = {}
for i = 1, #KEYS / 2 do
  local length, apart = redis.call('HSTRLEN', KEYS[2 * i - 1], ARGV[4 + i]), 0
  if length == 0 then
    length = redis.call('STRLEN', KEYS[2 * i])
    if length > 0 then apart = 1 end
  end
  table.insert(reply, length)
  table.insert(reply, apart)
end
return reply
