-- KEYS: mark; ARGV: id. Moves the watermark up, never down.
local current = redis.call('GET', KEYS[1])
if not current or #current < #ARGV[1] or (#current == #ARGV[1] and current < ARGV[1]) then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return 1
