-- KEYS: the chat's six (_chat). ARGV: the chat's three (_chat), then 4 cap, 5 seed, 6 most
-- assignments; with cs.assigned on (pmq.domain.events), KEYS[7] the chat's outbox and ARGV
-- 7, 8 an event id (each event's is it and its number) and the time. Assigns queued sessions
-- in order while some agent is under the cap; returns {sid, user, agent, ...} of those
-- assigned.
-- Keys reached from inside ({cs}), all learnt from the queue: each queued session's hash,
-- its user's last agent, the assigned sessions of the agent picked.
--! include _chat
--! include _event
local cap, seed, out = tonumber(ARGV[4]), tonumber(ARGV[5]), {}
for i = 1, tonumber(ARGV[6]) do
    local sid = redis.call('LINDEX', KEYS[4], 0)
    if not sid then break end
    local skey = key('session', sid)
    local s = redis.call('HMGET', skey, 'status', 'user')
    if s[1] ~= 'queued' then
        redis.call('LPOP', KEYS[4])
    else
        local agent = pick(key('last', s[2]), cap, seed + i)
        if not agent then break end
        redis.call('LPOP', KEYS[4])
        assign(sid, skey, agent)
        out[#out + 1] = sid
        out[#out + 1] = s[2]
        out[#out + 1] = agent
        if KEYS[7] then
            queue_event(KEYS[7], ARGV[7] .. i, 'cs.assigned', ARGV[8],
                {session_id = sid, user = s[2], agent = agent})
        end
    end
end
return out
