-- KEYS: the chat's six (_chat), then 7 the user's current session, 8 the user's sessions,
-- 9 the user's last agent, 10 the new session's hash.
-- ARGV: the chat's three (_chat), then 4 cap, 5 seed, 6 user, 7 new session id, 8 ttl
-- (seconds a session is remembered), 9 new sessions the user may open in any hour; with
-- cs.assigned on (pmq.domain.events), KEYS[11] the chat's outbox and ARGV 10, 11 the event's
-- id and time.
-- Keys reached from inside ({cs}): the hash of the user's current session (read from
-- KEYS[7]) and the assigned sessions of the agent picked.
-- Returns {0, sid, agent|'', position|nil} for the user's existing session, {1, sid, agent}
-- for a new assigned one, {2, sid, '', position} for a new queued one, {3} when the user
-- opened the most sessions an hour allows (the user's sessions by opening time tell).
--! include _chat
--! include _event
local user, sid = ARGV[6], ARGV[7]
local current = redis.call('GET', KEYS[7])
if current then
    local s = redis.call('HMGET', key('session', current), 'status', 'agent')
    if s[1] == 'open' then return {0, current, s[2]} end
    if s[1] == 'queued' then
        local pos = redis.call('LPOS', KEYS[4], current)
        if not pos then pos = redis.call('RPUSH', KEYS[4], current) - 1 end
        return {0, current, '', pos + 1}
    end
end
local mine, ttl = KEYS[8], tonumber(ARGV[8])
local hour_ago = string.format('%d', tonumber(NOW) - 3600000)
if redis.call('ZCOUNT', mine, '(' .. hour_ago, '+inf') >= tonumber(ARGV[9]) then return {3} end
local agent = pick(KEYS[9], tonumber(ARGV[4]), tonumber(ARGV[5]))
redis.call('HSET', KEYS[10], 'id', sid, 'user', user, 'agent', '',
    'status', 'queued', 'opened', NOW, 'active', NOW, 'count', 0)
redis.call('SET', KEYS[7], sid)
redis.call('ZADD', mine, NOW, sid)
redis.call('ZREMRANGEBYSCORE', mine, '-inf', string.format('%d', tonumber(NOW) - ttl * 1000))
redis.call('EXPIRE', mine, ttl)
if agent then
    assign(sid, KEYS[10], agent)
    if KEYS[11] then
        queue_event(KEYS[11], ARGV[10], 'cs.assigned', ARGV[11],
            {session_id = sid, user = user, agent = agent})
    end
    return {1, sid, agent}
end
return {2, sid, '', redis.call('RPUSH', KEYS[4], sid)}
