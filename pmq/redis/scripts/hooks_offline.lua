-- KEYS: the bucket's hook_online, hook_leaving, hook_outbox, then the user_conns of each
-- user. ARGV: now (unix ms), then per user of KEYS[i + 3]: uid, its user.offline event
-- (pmq.wire.events; '' when the site takes no user.offline).
-- Each user whose user.offline is due and who has no connection is offline: the event is
-- queued. One who came back is left online. Either way the user leaves hook_leaving.
-- Returns how many events it queued.
local now = tonumber(ARGV[1])
local sent = 0
for i = 4, #KEYS do
    local uid, event = ARGV[(i - 4) * 2 + 2], ARGV[(i - 4) * 2 + 3]
    local due = redis.call('ZSCORE', KEYS[2], uid)
    if due and tonumber(due) <= now then
        redis.call('ZREM', KEYS[2], uid)
        if redis.call('EXISTS', KEYS[i]) == 0 and redis.call('HDEL', KEYS[1], uid) == 1
            and event ~= '' then
            redis.call('RPUSH', KEYS[3], event)
            sent = sent + 1
        end
    end
end
return sent
