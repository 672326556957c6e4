-- KEYS: the bucket's hook_online, hook_leaving, hook_outbox. ARGV: uid, the user.online
-- event (pmq.wire.events; '' when the site takes no user.online).
-- A connection of the user opened: a user.offline due is cancelled, and a user the site
-- was not told is online becomes so (the event queued). Returns 1 when it queued one.
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HSETNX', KEYS[1], ARGV[1], 1) == 1 and ARGV[2] ~= '' then
    redis.call('RPUSH', KEYS[3], ARGV[2])
    return 1
end
return 0
