-- KEYS: the chat's six (_chat), then 7 the session's hash.
-- ARGV: the chat's three (_chat), then 4 sid, 5 by ('' = the idle closer), 6 reason, 7 idle
-- cutoff ms ('' = none), 8 ttl, 9 the storage op of the closed session
-- (pmq.wire.storeops.encode_cs_session), whose user, agent, opening and closing times and
-- last message id this script fills in; with cs.closed on (pmq.domain.events), KEYS[8] the
-- chat's outbox and ARGV 10, 11 the event's id and time.
-- Keys reached from inside ({cs}), learnt from the session: its user's current session and
-- last agent, its agent's assigned sessions.
-- Returns {200, user, agent|''}, {404}, {403}, {409} closed already, or {304} when the
-- session saw activity after the cutoff (not idle any more).
--! include _chat
--! include _event
local sid, by = ARGV[4], ARGV[5]
local skey = KEYS[7]
local s = redis.call('HMGET', skey, 'user', 'agent', 'status', 'active', 'opened', 'last_id')
if not s[1] then
    redis.call('ZREM', KEYS[3], sid)
    return {404}
end
if by ~= '' and by ~= s[1] and by ~= s[2] then return {403} end
if s[3] == 'closed' then return {409} end
if ARGV[7] ~= '' and tonumber(s[4]) > tonumber(ARGV[7]) then return {304} end
local ttl = tonumber(ARGV[8])
redis.call('HSET', skey, 'status', 'closed', 'closed', NOW, 'closed_by', by, 'reason', ARGV[6])
redis.call('EXPIRE', skey, ttl)
local current = key('user_session', s[1])
if redis.call('GET', current) == sid then redis.call('DEL', current) end
redis.call('ZREM', KEYS[3], sid)
if s[3] == 'open' then
    if redis.call('HINCRBY', KEYS[2], s[2], -1) <= 0 then redis.call('HDEL', KEYS[2], s[2]) end
    redis.call('ZREM', key('agent_sessions', s[2]), sid)
    redis.call('SET', key('last', s[1]), s[2], 'EX', ttl)
else
    redis.call('LREM', KEYS[4], 0, sid)
end
local op = cjson.decode(ARGV[9])
op.uid, op.agent, op.opened, op.closed, op.last_msg_id = s[1], s[2], s[5], NOW, s[6] or ''
redis.call('RPUSH', KEYS[5], cjson.encode(op))
if KEYS[8] then
    local agent = s[2] ~= '' and s[2] or cjson.null
    queue_event(KEYS[8], ARGV[10], 'cs.closed', ARGV[11],
        {session_id = sid, user = s[1], agent = agent})
end
return {200, s[1], s[2]}
