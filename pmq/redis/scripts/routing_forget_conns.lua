-- KEYS: user_conns of each user (users of one bucket); ARGV[1] worker id, ARGV[i + 1] the
-- conn id in KEYS[i]. Removes those connection entries that still name the worker; returns
-- how many.
local removed = 0
for i = 1, #KEYS do
    if redis.call('HGET', KEYS[i], ARGV[i + 1]) == ARGV[1] then
        removed = removed + redis.call('HDEL', KEYS[i], ARGV[i + 1])
    end
end
return removed
