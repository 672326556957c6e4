-- KEYS: owners, then the taken list of each owner; ARGV: lease ms, then the owners (ARGV[i]
-- owns KEYS[i]). Registers each owner whose taken list exists and that is not registered,
-- with a lease from now; returns how many were registered.
--! include _now
local adopted = 0
for i = 2, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1
        and redis.call('ZADD', KEYS[1], 'NX', now + tonumber(ARGV[1]), ARGV[i]) == 1 then
        adopted = adopted + 1
    end
end
return adopted
