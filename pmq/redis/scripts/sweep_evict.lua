-- KEYS: inbox, bodies, cold, index; ARGV: uid, cold_ttl, cold mark ('0': leave the flag), ids...
-- The mark is new on every sweep, so a reader that saw storage empty deletes the flag only
-- if no sweep set it again meanwhile (see the socket worker's cold_messages).
-- Removes ids from the hot inbox, flags the user cold if asked, and points the index at the
-- new oldest hot message (or drops the user from it). Returns that message's ms, or -1.
if #ARGV > 3 then
    redis.call('ZREM', KEYS[1], unpack(ARGV, 4))
    redis.call('HDEL', KEYS[2], unpack(ARGV, 4))
end
if ARGV[3] ~= '0' then
    redis.call('SET', KEYS[3], ARGV[3], 'EX', tonumber(ARGV[2]))
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #oldest == 0 then
    redis.call('ZREM', KEYS[4], ARGV[1])
    return -1
end
redis.call('ZADD', KEYS[4], oldest[2], ARGV[1])
return tonumber(oldest[2])
