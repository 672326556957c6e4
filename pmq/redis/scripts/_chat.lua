-- Shared by the chat's scripts (pmq.domain.chat). KEYS 1-6, the same for each: online agents, agent
-- load, active index, queue, the chat's storage queue, history index; a script's own keys
-- follow from KEYS[7]. ARGV[1]: a JSON table of key templates (name -> [before, after]
-- around an id, pmq.redis.keys.key_template) for the keys a script learns only inside (a session
-- read from the queue, an agent picked); every one carries the {cs} hash tag of the
-- declared keys: one Redis Cluster slot. ARGV[2]: the time in unix ms. ARGV[3]: a JSON list
-- of the online agents that hold a connection now (checked by pmq.domain.chat just before: the
-- connection registry lives in the users' buckets, another slot, which a script cannot
-- read). A script's own arguments start at ARGV[4].
local T = cjson.decode(ARGV[1])
local NOW = ARGV[2]
local function key(name, id) return T[name][1] .. id .. T[name][2] end

-- An agent counts as online while it holds a connection (the caller's list).
local LIVE = {}
for _, agent in ipairs(cjson.decode(ARGV[3])) do LIVE[agent] = true end
local function connected(agent) return LIVE[agent] == true end

local function load_of(agent) return tonumber(redis.call('HGET', KEYS[2], agent) or '0') end

-- The agent for a session of a user whose last agent `last_key` names: that agent when
-- online and under the cap, else one of the least loaded online agents under the cap
-- (`seed` picks among ties); false when there is none.
local function pick(last_key, cap, seed)
    local last = redis.call('GET', last_key)
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

-- Assigns session `sid` (its hash: `skey`) to `agent`; reaches the agent's assigned
-- sessions from inside (key 'agent_sessions').
local function assign(sid, skey, agent)
    redis.call('HSET', skey, 'agent', agent, 'status', 'open', 'active', NOW)
    redis.call('HINCRBY', KEYS[2], agent, 1)
    redis.call('ZADD', key('agent_sessions', agent), NOW, sid)
    redis.call('ZADD', KEYS[3], NOW, sid)
end
