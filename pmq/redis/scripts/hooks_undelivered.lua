-- KEYS: the bucket's hook_undelivered, hook_outbox, then the inbox of each message's user.
-- ARGV: now (unix ms), then per message of KEYS[i + 2]: its timer (the member of
-- hook_undelivered), its id, its message.undelivered event (pmq.wire.events).
-- Each timer due goes; its event is queued when the message is still in its user's inbox
-- (not acked). Returns how many events it queued.
local now = tonumber(ARGV[1])
local sent = 0
for i = 3, #KEYS do
    local a = (i - 3) * 3 + 2
    local due = redis.call('ZSCORE', KEYS[1], ARGV[a])
    if due and tonumber(due) <= now then
        redis.call('ZREM', KEYS[1], ARGV[a])
        if redis.call('ZSCORE', KEYS[i], ARGV[a + 1]) then
            redis.call('RPUSH', KEYS[2], ARGV[a + 2])
            sent = sent + 1
        end
    end
end
return sent
