-- KEYS: the chat's six (_chat), then 7 the session's hash, 8 its history, 9 its bodies.
-- ARGV: the chat's three (_chat), then 4 sid, 5 sender, 6 message id, 7 its ms (the
-- history's score), 8 and 9 the message JSON (pmq.wire.client.Message.encode) before and
-- after its recipient, 10 and 11 the storage op (pmq.wire.storeops.encode_cs_message)
-- before and after the recipient, 12 history max, 13 ttl.
-- Checks the sender may send now (a party of an open session) and, in the same step, marks
-- the session active, keeps the message in its history, and queues it for storage, the
-- sender's peer filled in as the recipient (the JSON string of the peer's uid); no key is
-- reached from inside. Returns {200, peer}, {404}, {403}, {409, status}: refused, nothing
-- kept.
--! include _chat
local sid, sender, id = ARGV[4], ARGV[5], ARGV[6]
local skey, hkey, bkey = KEYS[7], KEYS[8], KEYS[9]
local s = redis.call('HMGET', skey, 'user', 'agent', 'status')
if not s[1] then return {404} end
if sender ~= s[1] and (s[2] == '' or sender ~= s[2]) then return {403} end
if s[3] ~= 'open' then return {409, s[3]} end
local peer = s[2]
if sender ~= s[1] then peer = s[1] end
local to = cjson.encode(peer)
local message = ARGV[8] .. to .. ARGV[9]
redis.call('ZADD', KEYS[3], 'XX', NOW, sid)
local ttl = tonumber(ARGV[13])
redis.call('ZADD', hkey, ARGV[7], id)
redis.call('HSET', bkey, id, message)
local over = redis.call('ZCARD', hkey) - tonumber(ARGV[12])
if over > 0 then
    local old = redis.call('ZRANGE', hkey, 0, over - 1)
    redis.call('ZREMRANGEBYRANK', hkey, 0, over - 1)
    redis.call('HDEL', bkey, unpack(old))
end
-- The history index holds the session's oldest kept message (or older), for the sweep.
local oldest = redis.call('ZRANGE', hkey, 0, 0, 'WITHSCORES')
redis.call('ZADD', KEYS[6], 'NX', oldest[2], sid)
redis.call('EXPIRE', hkey, ttl)
redis.call('EXPIRE', bkey, ttl)
redis.call('HSET', skey, 'active', NOW, 'last', message, 'last_id', id)
redis.call('HINCRBY', skey, 'count', 1)
redis.call('RPUSH', KEYS[5], ARGV[10] .. to .. ARGV[11])
return {200, peer}
