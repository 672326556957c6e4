-- KEYS: history index. ARGV: 1 key templates (as for the others, _chat), 2 cutoff ms, 3 most
-- sessions. Keys reached from inside ({cs}, the slot of the index), learnt from the index:
-- each session's history and bodies.
-- Removes the messages older than the cutoff from the histories of at most that many
-- sessions whose oldest kept message is older, oldest first, and points the index at each
-- one's new oldest message (or drops the session from it). Returns {sessions, messages}.
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
