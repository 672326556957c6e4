-- KEYS: dedupe, queue, index, owners (id -> uid until stored), then per message: the user's Keys.publish_keys().
-- ARGV: has_dedupe, dedupe_ttl, inbox_ttl, ids_json, then per message:
--       id, ms, uid, message_json, unread_kind ('' = counts nothing), storage_op_json.
-- Returns {1, conns_1, unread_1, ...} for new messages: per message the user's connections,
-- then (when it counts and the user is online) the user's unread hash as field/value pairs
-- followed by the time of their last clear of system, for the badge (a
-- pmq.wire.relay.UnreadState). For a repeated
-- idempotency key: {0, ids_json, wire_1, conns_1, ...}, per first message its wire JSON
-- ('' once acked) and the user's connections, so that the repeat pushes what the first
-- publisher may never have pushed (it died between this script and its push).
if ARGV[1] == '1' then
    local previous = redis.call('GET', KEYS[1])
    if previous then
        local first = cjson.decode(previous)
        local repeated = {0, previous}
        for i = 0, (#KEYS - 4) / 5 - 1 do
            local k = 5 + i * 5
            local wire = first[i + 1] and redis.call('HGET', KEYS[k + 1], first[i + 1])
            repeated[#repeated + 1] = wire or ''
            repeated[#repeated + 1] = wire and redis.call('HGETALL', KEYS[k + 3]) or {}
        end
        return repeated
    end
end
local result = {1}
local ttl = tonumber(ARGV[3])
local n = (#KEYS - 4) / 5
for i = 0, n - 1 do
    local k = 5 + i * 5
    local a = 5 + i * 6
    redis.call('ZADD', KEYS[k], ARGV[a + 1], ARGV[a])
    redis.call('HSET', KEYS[k + 1], ARGV[a], ARGV[a + 3])
    redis.call('EXPIRE', KEYS[k], ttl)
    redis.call('EXPIRE', KEYS[k + 1], ttl)
    local conns = redis.call('HGETALL', KEYS[k + 3])
    local unread = {}
    if ARGV[a + 4] ~= '' then
        redis.call('HINCRBY', KEYS[k + 2], ARGV[a + 4], 1)
        if #conns > 0 then  -- a badge to send with the push; none for a user offline
            unread = redis.call('HGETALL', KEYS[k + 2])
            unread[#unread + 1] = redis.call('HGET', KEYS[k + 4], 'system') or '0'
        end
    end
    redis.call('ZADD', KEYS[3], 'NX', ARGV[a + 1], ARGV[a + 2])
    redis.call('RPUSH', KEYS[2], ARGV[a + 5])
    redis.call('HSET', KEYS[4], ARGV[a], ARGV[a + 2])
    result[#result + 1] = conns
    result[#result + 1] = unread
end
if ARGV[1] == '1' then
    redis.call('SET', KEYS[1], ARGV[4], 'EX', tonumber(ARGV[2]))
end
return result
