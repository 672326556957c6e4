-- KEYS: queue, taken, owners; ARGV: batch, owner, lease ms. Tops the taken list up to
-- ``batch`` items from the head of the queue and returns the whole taken list, leftovers of a
-- failed attempt included. An owner holding items is registered with a fresh lease in the
-- same step, so no taken list is ever outside the registry (pmq.tasks.owners).
--! include _now
local want = tonumber(ARGV[1]) - redis.call('LLEN', KEYS[2])
if want > 0 then
    local items = redis.call('LRANGE', KEYS[1], 0, want - 1)
    if #items > 0 then
        redis.call('LTRIM', KEYS[1], #items, -1)
        redis.call('RPUSH', KEYS[2], unpack(items))
    end
end
local taken = redis.call('LRANGE', KEYS[2], 0, -1)
if #taken > 0 then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[2])
end
return taken
