-- KEYS: the broadcast's group zset, index, bodies, revoked zset, the broadcasts' storage
-- queue. ARGV: id, its unix ms, the storage op (pmq.wire.storeops.encode_amend, bc_revoke),
-- retention seconds, retention floor (unix ms).
-- Retracts a broadcast: out of its group (the system unread count follows), the index and
-- the bodies; kept among the revoked within retention (storage reads are corrected by
-- them until the writer has the op). Returns 1, or 0 when it was retracted before.
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[5])
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[4]))
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('RPUSH', KEYS[5], ARGV[3])
return 1
