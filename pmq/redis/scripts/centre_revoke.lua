-- KEYS: the user's inbox, bodies, unread hash, last-read hash, amends; the bucket's storage
-- queue; the user's acked-unstored hash. ARGV: id, its unix ms, the kind it counted in the badge ('' = counted nothing),
-- the storage op (pmq.wire.storeops.encode_amend, revoke), amends ttl seconds.
-- Retracts a unicast message: out of the inbox, an amend saying so (what storage reads are
-- corrected by), its badge count back by one if it was not seen yet (after the user's last
-- clear of its kind, and never below 0), the op queued. Returns 1, or 0 when it was
-- retracted before.
if redis.call('HGET', KEYS[5], ARGV[1]) == '' then return 0 end
redis.call('HSET', KEYS[5], ARGV[1], '')
redis.call('EXPIRE', KEYS[5], tonumber(ARGV[5]))
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
local kind = ARGV[3]
if kind ~= '' then
    local cleared = tonumber(redis.call('HGET', KEYS[4], kind) or '0')
    if tonumber(ARGV[2]) > cleared and tonumber(redis.call('HGET', KEYS[3], kind) or '0') > 0 then
        redis.call('HINCRBY', KEYS[3], kind, -1)
    end
end
redis.call('RPUSH', KEYS[6], ARGV[4])
return 1
