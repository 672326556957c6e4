-- KEYS: the lease; ARGV: owner, ttl ms. Takes the lease when free, renews it when the
-- caller holds it; returns 1 when the caller holds it now, 0 when another does.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
