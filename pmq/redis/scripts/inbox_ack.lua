-- KEYS: inbox, bodies, queue, cold flag, the bucket's mark, the bucket's owners, the user's
-- acked-unstored hash, the user's set of acks queued for storage; ARGV[1]: the storage op
-- acking every id asked
-- (pmq.wire.storeops.encode_ack), ARGV[2]: the acked-unstored hash's ttl. Removes what is
-- hot and queues the storage ack of those (their rows may not be written yet): the same op,
-- keeping those ids; one storage does not hold yet (it has an owners entry) keeps its body
-- in the acked-unstored hash until the writer stores it (the notification centre lists it). The
-- others are queued too when storage may hold unacked messages of the user (flagged cold, or
-- the bucket not known complete): the writer acks them there, so a socket worker never writes
-- storage for an ack. While reads of the user may go to storage, every id queued waits in
-- the set of acks queued until the writer has acked it there: msg.pull and replays leave
-- those out. With message.acked on (pmq.domain.events), KEYS[9] is the bucket's
-- outbox and ARGV[3], ARGV[4] the event's id and time: the event lists the hot ids, or every
-- id asked once when the others were queued too. Returns {the hot ids, how many others were
-- queued}.
--! include _event
local op = cjson.decode(ARGV[1])
local removed, others = {}, {}
for _, id in ipairs(op.ids) do
    if redis.call('ZREM', KEYS[1], id) == 1 then
        removed[#removed + 1] = id
        local body = redis.call('HEXISTS', KEYS[6], id) == 1 and redis.call('HGET', KEYS[2], id)
        if body then
            redis.call('HSET', KEYS[7], id, body)
            redis.call('EXPIRE', KEYS[7], tonumber(ARGV[2]))
        end
    else
        others[#others + 1] = id
    end
end
redis.call('HDEL', KEYS[2], unpack(op.ids))
local queued = {unpack(removed)}
local cold = 0
-- Whether reads of this user's inbox may go to storage (pmq.domain.inbox's pending()).
local storage_read = redis.call('EXISTS', KEYS[4]) == 1
        or redis.call('HEXISTS', KEYS[5], 'epoch') == 0
if #others > 0 and storage_read then
    for _, id in ipairs(others) do queued[#queued + 1] = id end
    cold = #others
end
if #queued > 0 and storage_read then  -- their rows are unacked until the writer acks them
    redis.call('SADD', KEYS[8], unpack(queued))
    redis.call('EXPIRE', KEYS[8], tonumber(ARGV[2]))
end
if KEYS[9] then
    local ids, seen = removed, {}
    if cold > 0 then
        ids = {}
        for _, id in ipairs(op.ids) do
            if not seen[id] then ids[#ids + 1], seen[id] = id, true end
        end
    end
    if #ids > 0 then
        queue_event(KEYS[9], ARGV[3], 'message.acked', ARGV[4], {uid = op.uid, ids = ids})
    end
end
if #queued > 0 then
    op.ids = queued
    redis.call('RPUSH', KEYS[3], cjson.encode(op))
end
return {removed, cold}
