-- KEYS: queue, taken, owners; ARGV: owner, lease ms. Moves the head of the queue to the
-- taken list and registers the owner with a fresh lease, in one step; returns the item.
--! include _now
local item = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
if item then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
end
return item
