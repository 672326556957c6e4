-- KEYS: unread hash, last-read hash, storage queue (one bucket). ARGV: '1' when system is
-- cleared, now ms, last-read ttl, storage op, then the kinds to clear.
-- Every kind's clear time is kept (a retraction's badge counts back only what was not seen
-- yet); only system's is stored.
for i = 5, #ARGV, 1000 do  -- unpack() of many thousands overflows Lua's stack
    redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
for i = 5, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], ARGV[2]) end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
if ARGV[1] == '1' then
    redis.call('RPUSH', KEYS[3], ARGV[4])
end
return 1
