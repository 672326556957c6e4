-- KEYS: taken, dead; ARGV: dead-letter entries. Ends a batch: the refused items go to the
-- dead-letter list and the taken list is deleted, in one step.
if #ARGV > 0 then
    redis.call('RPUSH', KEYS[2], unpack(ARGV))
end
return redis.call('DEL', KEYS[1])
