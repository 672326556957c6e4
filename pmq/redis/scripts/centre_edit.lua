-- KEYS: the user's bodies, amends; the bucket's storage queue; the user's acked-unstored hash. ARGV: id, the message JSON
-- with its new body, the storage op (pmq.wire.storeops.encode_amend, edit), amends ttl.
-- Replaces the body where Redis holds the message (the hot inbox, or acked and not stored yet)
-- and keeps the edit as an
-- amend for storage reads until the writer has it. Returns 1, or 0 for a retracted message.
if redis.call('HGET', KEYS[2], ARGV[1]) == '' then return 0 end
for _, key in ipairs({KEYS[1], KEYS[4]}) do
    if redis.call('HEXISTS', key, ARGV[1]) == 1 then
        redis.call('HSET', key, ARGV[1], ARGV[2])
    end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
