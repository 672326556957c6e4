-- KEYS: an outbox's lease (hook_lease, or hook_chat_lease), the outbox. ARGV: owner, count,
-- the first event sent.
-- The site took the first ``count`` events of the outbox: they go, if the caller still holds
-- the outbox's lease and the outbox still starts with what it sent (a worker whose lease
-- lapsed during its POST never removes what another sent meanwhile). Returns 1 if they went.
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('LINDEX', KEYS[2], 0) == ARGV[3] then
    redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
    return 1
end
return 0
