-- KEYS: the user's reads hash, read ids, the bucket's storage queue.
-- ARGV: ttl seconds, retention floor (unix ms), the read op (pmq.wire.storeops.encode_read:
-- every candidate [id, ms] and the marks to raise), then each candidate's kind.
-- Marks every candidate read and raises the marks; queues the op with only the ids that were
-- unread (and the marks raised). With message.read on (pmq.domain.events), KEYS[4] is the
-- bucket's outbox and the last two ARGV the event's id and time: the event lists the ids
-- that were unread. Returns those ids, or -1 when the user's read state is not loaded
-- (pmq.domain.reads loads it and calls again).
--! include _event
local function above(a, b)  -- ids as decimal strings: 63 bits do not fit a Lua number
    return #a > #b or (#a == #b and a > b)
end
if redis.call('HEXISTS', KEYS[1], 'loaded') == 0 then return -1 end
local op = cjson.decode(ARGV[3])
local current = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do current[flat[i]] = flat[i + 1] end
local function covered(id, kind, marks)
    return not above(id, marks['*'] or '0') or not above(id, marks[kind] or '0')
end
local changed = {}
for i, pair in ipairs(op.ids) do
    local id, kind = pair[1], ARGV[3 + i]
    if not covered(id, kind, current) and not redis.call('ZSCORE', KEYS[2], id) then
        changed[#changed + 1] = pair
        if not covered(id, kind, op.marks) then
            redis.call('ZADD', KEYS[2], pair[2], id)
        end
    end
end
local raised = false
for kind, mark in pairs(op.marks) do
    if above(mark, current[kind] or '0') then
        redis.call('HSET', KEYS[1], kind, mark)
        raised = true
    else
        op.marks[kind] = nil
    end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2])
for i = 1, 2 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1])) end
if #changed > 0 or raised then
    op.ids = changed
    redis.call('RPUSH', KEYS[3], cjson.encode(op))
end
local ids = {}
for i, pair in ipairs(changed) do ids[i] = pair[1] end
if KEYS[4] and #ids > 0 then
    queue_event(KEYS[4], ARGV[#ARGV - 1], 'message.read', ARGV[#ARGV], {uid = op.uid, ids = ids})
end
return ids
