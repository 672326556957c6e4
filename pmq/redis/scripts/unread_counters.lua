-- KEYS: per user, the unread hash then the last-read hash. Returns per user a list: the
-- unread hash's field/value pairs, then the time of the user's last clear of system (or 0),
-- as pmq.wire.relay.UnreadState.of_reply() reads it.
local result = {}
for i = 1, #KEYS, 2 do
    local counts = redis.call('HGETALL', KEYS[i])
    counts[#counts + 1] = redis.call('HGET', KEYS[i + 1], 'system') or '0'
    result[#result + 1] = counts
end
return result
