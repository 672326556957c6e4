"""The Lua scripts of the customer-service chat (pmq.chat), one per operation.

Every script gets the same KEYS — online agents, agent load, active index, queue, storage
queue, history index — and ARGV[1] a JSON table of key templates (name -> [before, after]
around an id, made from pmq.keys so the key shapes live there alone), ARGV[2] the time in
unix ms and ARGV[3] a JSON list of the online agents that hold a connection now (checked by
pmq.chat just before: the connection registry lives in the users' buckets, another slot on a
Redis Cluster, so a script cannot read it). Script arguments start at ARGV[4] (TRIM_HISTORY,
the sweep's, is apart: its KEYS and ARGV are its own). Every key a script touches,
declared or built from a template, carries the {cs} hash tag: one slot. Results that can
fail start with an HTTP-like code.
"""

from __future__ import annotations

PRELUDE = """
local T = cjson.decode(ARGV[1])
local NOW = ARGV[2]
local function key(name, id) return T[name][1] .. id .. T[name][2] end

-- An agent counts as online while it holds a connection (the caller's list).
local LIVE = {}
for _, agent in ipairs(cjson.decode(ARGV[3])) do LIVE[agent] = true end
local function connected(agent) return LIVE[agent] == true end

local function load_of(agent) return tonumber(redis.call('HGET', KEYS[2], agent) or '0') end

-- The agent for a session of `user`: the user's last agent when online and under the cap,
-- else one of the least loaded online agents under the cap (`seed` picks among ties);
-- false when there is none.
local function pick(user, cap, seed)
    local last = redis.call('GET', key('last', user))
    if last and redis.call('SISMEMBER', KEYS[1], last) == 1 and connected(last)
        and load_of(last) < cap then
        return last
    end
    local best, ties = nil, {}
    for _, agent in ipairs(redis.call('SMEMBERS', KEYS[1])) do
        if connected(agent) then
            local load = load_of(agent)
            if load < cap then
                if best == nil or load < best then
                    best, ties = load, {agent}
                elseif load == best then
                    ties[#ties + 1] = agent
                end
            end
        end
    end
    if #ties == 0 then return false end
    return ties[(seed % #ties) + 1]
end

local function assign(sid, agent)
    redis.call('HSET', key('session', sid), 'agent', agent, 'status', 'open', 'active', NOW)
    redis.call('HINCRBY', KEYS[2], agent, 1)
    redis.call('ZADD', key('agent_sessions', agent), NOW, sid)
    redis.call('ZADD', KEYS[3], NOW, sid)
end
"""

# ARGV: 4 cap, 5 seed, 6 user, 7 new session id, 8 ttl (seconds a session is remembered),
# 9 new sessions the user may open in any hour.
# Returns {0, sid, agent|'', position|nil} for the user's existing session, {1, sid, agent}
# for a new assigned one, {2, sid, '', position} for a new queued one, {3} when the user
# opened the most sessions an hour allows (the user's sessions by opening time tell).
OPEN = (
    PRELUDE
    + """
local user, sid = ARGV[6], ARGV[7]
local current = redis.call('GET', key('user_session', user))
if current then
    local s = redis.call('HMGET', key('session', current), 'status', 'agent')
    if s[1] == 'open' then return {0, current, s[2]} end
    if s[1] == 'queued' then
        local pos = redis.call('LPOS', KEYS[4], current)
        if not pos then pos = redis.call('RPUSH', KEYS[4], current) - 1 end
        return {0, current, '', pos + 1}
    end
end
local mine, ttl = key('user_sessions', user), tonumber(ARGV[8])
local hour_ago = string.format('%d', tonumber(NOW) - 3600000)
if redis.call('ZCOUNT', mine, '(' .. hour_ago, '+inf') >= tonumber(ARGV[9]) then return {3} end
local agent = pick(user, tonumber(ARGV[4]), tonumber(ARGV[5]))
redis.call('HSET', key('session', sid), 'id', sid, 'user', user, 'agent', '',
    'status', 'queued', 'opened', NOW, 'active', NOW, 'count', 0)
redis.call('SET', key('user_session', user), sid)
redis.call('ZADD', mine, NOW, sid)
redis.call('ZREMRANGEBYSCORE', mine, '-inf', string.format('%d', tonumber(NOW) - ttl * 1000))
redis.call('EXPIRE', mine, ttl)
if agent then
    assign(sid, agent)
    return {1, sid, agent}
end
return {2, sid, '', redis.call('RPUSH', KEYS[4], sid)}
"""
)

# ARGV: 4 cap, 5 seed, 6 most assignments. Assigns queued sessions in order while some
# agent is under the cap; returns {sid, user, agent, ...} of those assigned.
DRAIN = (
    PRELUDE
    + """
local cap, seed, out = tonumber(ARGV[4]), tonumber(ARGV[5]), {}
for i = 1, tonumber(ARGV[6]) do
    local sid = redis.call('LINDEX', KEYS[4], 0)
    if not sid then break end
    local s = redis.call('HMGET', key('session', sid), 'status', 'user')
    if s[1] ~= 'queued' then
        redis.call('LPOP', KEYS[4])
    else
        local agent = pick(s[2], cap, seed + i)
        if not agent then break end
        redis.call('LPOP', KEYS[4])
        assign(sid, agent)
        out[#out + 1] = sid
        out[#out + 1] = s[2]
        out[#out + 1] = agent
    end
end
return out
"""
)

# ARGV: 4 sid, 5 by ('' = the idle closer), 6 reason, 7 idle cutoff ms ('' = none), 8 ttl,
# 9 the storage op of the closed session (pmq.wire.storeops.encode_cs_session), whose
# user, agent, opening and closing times and last message id this script fills in.
# Returns {200, user, agent|''}, {404}, {403}, {409} closed already, or {304} when the
# session saw activity after the cutoff (not idle any more).
CLOSE = (
    PRELUDE
    + """
local sid, by = ARGV[4], ARGV[5]
local skey = key('session', sid)
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
return {200, s[1], s[2]}
"""
)

# ARGV: 4 sid, 5 sender. Checks the sender may send now and marks the session active.
# Returns {200, peer}, {404}, {403}, {409, status}.
CHECK_SEND = (
    PRELUDE
    + """
local sid, sender = ARGV[4], ARGV[5]
local skey = key('session', sid)
local s = redis.call('HMGET', skey, 'user', 'agent', 'status')
if not s[1] then return {404} end
if sender ~= s[1] and (s[2] == '' or sender ~= s[2]) then return {403} end
if s[3] ~= 'open' then return {409, s[3]} end
redis.call('HSET', skey, 'active', NOW)
redis.call('ZADD', KEYS[3], 'XX', NOW, sid)
if sender == s[1] then return {200, s[2]} end
return {200, s[1]}
"""
)

# ARGV: 4 sid, 5 message id, 6 message ms, 7 message JSON, 8 history max, 9 ttl,
# 10 storage op. Keeps a sent message in the session's history and queues it for storage.
RECORD = (
    PRELUDE
    + """
local sid, id = ARGV[4], ARGV[5]
local hkey, bkey, skey = key('history', sid), key('bodies', sid), key('session', sid)
local ttl = tonumber(ARGV[9])
redis.call('ZADD', hkey, ARGV[6], id)
redis.call('HSET', bkey, id, ARGV[7])
local over = redis.call('ZCARD', hkey) - tonumber(ARGV[8])
if over > 0 then
    local old = redis.call('ZRANGE', hkey, 0, over - 1)
    redis.call('ZREMRANGEBYRANK', hkey, 0, over - 1)
    redis.call('HDEL', bkey, unpack(old))
end
-- The history index holds the session's oldest kept message (or older), for the sweep.
local oldest = redis.call('ZRANGE', hkey, 0, 0, 'WITHSCORES')
redis.call('ZADD', KEYS[6], 'NX', oldest[2], sid)
redis.call('EXPIRE', hkey, ttl)
redis.call('EXPIRE', bkey, ttl)
if redis.call('EXISTS', skey) == 1 then
    redis.call('HSET', skey, 'last', ARGV[7], 'last_id', id)
    redis.call('HINCRBY', skey, 'count', 1)
end
redis.call('RPUSH', KEYS[5], ARGV[10])
return 1
"""
)

# KEYS: history index. ARGV: 1 templates (as for the others), 2 cutoff ms, 3 most sessions.
# Removes the messages older than the cutoff from the histories of at most that many
# sessions whose oldest kept message is older, oldest first, and points the index at each
# one's new oldest message (or drops the session from it). Returns {sessions, messages}.
TRIM_HISTORY = """
local T = cjson.decode(ARGV[1])
local function key(name, id) return T[name][1] .. id .. T[name][2] end
local below = '(' .. ARGV[2]
local sids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', below, 'LIMIT', 0, ARGV[3])
local removed = 0
for _, sid in ipairs(sids) do
    local hkey = key('history', sid)
    local old = redis.call('ZRANGEBYSCORE', hkey, '-inf', below)
    if #old > 0 then  -- at most HISTORY_MAX per session: within unpack()'s limit
        redis.call('ZREMRANGEBYSCORE', hkey, '-inf', below)
        redis.call('HDEL', key('bodies', sid), unpack(old))
        removed = removed + #old
    end
    local oldest = redis.call('ZRANGE', hkey, 0, 0, 'WITHSCORES')
    if #oldest == 0 then
        redis.call('ZREM', KEYS[1], sid)
    else
        redis.call('ZADD', KEYS[1], oldest[2], sid)
    end
end
return {#sids, removed}
"""
