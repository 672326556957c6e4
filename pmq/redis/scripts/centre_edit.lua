-- KEYS: the user's bodies, amends; the bucket's storage queue. ARGV: id, the message JSON
-- with its new body, the storage op (pmq.wire.storeops.encode_amend, edit), amends ttl.
-- Replaces the body where Redis holds the message (the hot inbox) and keeps the edit as an
-- amend for storage reads until the writer has it. Returns 1, or 0 for a retracted message.
if redis.call('HGET', KEYS[2], ARGV[1]) == '' then return 0 end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
