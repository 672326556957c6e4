-- KEYS: the keys (of one slot); ARGV[1]: seconds. Pushes back the TTL of every key named.
-- Returns the positions (from 1) of the keys that no longer exist.
local missing = {}
for i = 1, #KEYS do
    if redis.call('EXPIRE', KEYS[i], ARGV[1]) == 0 then
        missing[#missing + 1] = i
    end
end
return missing
