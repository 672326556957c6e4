-- KEYS: owners, taken, queue; ARGV: owner, force. Moves the owner's taken list back to the
-- head of the queue in order and unregisters it; returns how many items moved. Unless force
-- is '1' (a worker stopping gives back its own list), only while the owner's lease is still
-- expired: -1 when the owner is alive again or another reclaimer was first.
--! include _now
if ARGV[2] ~= '1' then
    local lease = redis.call('ZSCORE', KEYS[1], ARGV[1])
    if not lease or tonumber(lease) >= now then return -1 end
end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
for i = #items, 1, -1 do
    redis.call('LPUSH', KEYS[3], items[i])
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return #items
