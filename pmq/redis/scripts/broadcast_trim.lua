-- KEYS: index zset, bodies. ARGV: the group key's template (before, after), cutoff ms,
-- most ids. Removes up to that many broadcasts older than the cutoff (by the index) from
-- the index, the bodies and their groups' ids; returns how many.
-- Keys reached from inside: each group's zset (pmq.redis.keys.broadcasts), built from the
-- template around a group named in a body. Every one carries the {bc} hash tag of the
-- declared keys: one Redis Cluster slot.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3], 'LIMIT', 0, ARGV[4])
if #ids == 0 then return 0 end
local groups = {}
for _, body in ipairs(redis.call('HMGET', KEYS[2], unpack(ids))) do
    local ok, message = pcall(cjson.decode, body or '')
    if ok and type(message) == 'table' and type(message.group) == 'string' then
        groups[message.group] = true
    end
end
for group in pairs(groups) do
    redis.call('ZREMRANGEBYSCORE', ARGV[1] .. group .. ARGV[2], '-inf', '(' .. ARGV[3])
end
redis.call('HDEL', KEYS[2], unpack(ids))
redis.call('ZREM', KEYS[1], unpack(ids))
return #ids
