-- KEYS: dead, queue; ARGV: entry, item, entry, item, ... Each entry still in the dead list
-- leaves it and its item goes to the queue's tail, so two operators retrying at once move
-- an item once. Returns how many moved.
local moved = 0
for i = 1, #ARGV, 2 do
    if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 then
        redis.call('RPUSH', KEYS[2], ARGV[i + 1])
        moved = moved + 1
    end
end
return moved
