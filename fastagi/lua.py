"""Every Lua script, in one place: one atomic step per screened call, ban and unban.

Time comes from Redis (`TIME`), so every PBX of a cluster agrees on windows and ban
ends whatever its own clock says. Times are integer milliseconds. Numbers handed to
redis.call go through `int()` so Lua 5.1 (Redis) and Lua 5.4 (fakeredis) write the
same text.

A ban is a set of holds, one per source (the threshold, each fail2ban jail, an admin,
a restore): a hash target -> {source: '<end ms> <reason>'}. The ban list (`banned`)
keeps target -> the longest hold's end, so agents read one sorted set and the events
change only when that end does. The hash expires with its longest hold; a shorter hold
that ended is skipped by every reader and dropped at the next write. Targets are opaque
text (an address or a network).
"""

_CLOCK = """
local function int(x) return string.format('%d', math.floor(x)) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The holds' functions. The screening step defines them only on the call that bans:
# Lua makes each function anew on every run, ~1.5 us of Redis CPU per step otherwise.
_HOLDS = """

-- The longest hold: its end (0: none) and reason.
local function longest(holds)
  local top, why = 0, ''
  for _, hold in pairs(holds) do
    if hold[1] > top then top, why = hold[1], hold[2] end
  end
  return top, why
end

-- The target's running holds: source -> {end, reason}. Ended ones leave the hash. A ban
-- list end beyond every hold was written without one (before holds existed, or by an
-- older version during an upgrade): it counts as the hold 'legacy', so nothing here
-- ever shortens it.
local function read_holds(k, target)
  local flat = redis.call('HGETALL', k.holds)
  local holds = {}
  for i = 1, #flat, 2 do
    local e, reason = string.match(flat[i + 1], '^(%d+) (.*)$')
    e = tonumber(e)
    if e and e > now then
      holds[flat[i]] = {e, reason}
    else
      redis.call('HDEL', k.holds, flat[i])
    end
  end
  local listed = tonumber(redis.call('ZSCORE', k.banned, target))
  if listed and listed > now and listed > longest(holds) then
    holds['legacy'] = {listed, redis.call('HGET', k.record, 'reason') or ''}
    redis.call('HSET', k.holds, 'legacy', int(listed) .. ' ' .. holds['legacy'][2])
    redis.call('PEXPIREAT', k.holds, int(listed))
  end
  return holds
end

-- The record lives as long as the ban plus the history that escalation looks back on.
local function keep_record(k, top, history)
  if redis.call('PTTL', k.record) < top - now + history then
    redis.call('PEXPIRE', k.record, int(top - now + history))
  end
end

-- The ban list, the hash's expiry and the event follow the longest hold, when it changed.
-- No `k.events`: no event (a bulk import sends one `sync` event for the whole batch).
local function publish(k, target, old_top, top, why, pbx, maxlen)
  if top == old_top then return end
  if top == 0 then
    redis.call('ZREM', k.banned, target)
    redis.call('DEL', k.holds)
    redis.call('XADD', k.events, 'MAXLEN', '~', maxlen, '*', 'op', 'unban', 'ip', target,
               'pbx_id', pbx)
    redis.call('HINCRBY', k.stats, 'unbans', 1)
    return
  end
  redis.call('ZADD', k.banned, int(top), target)
  redis.call('PEXPIREAT', k.holds, int(top))
  if k.events then
    redis.call('XADD', k.events, 'MAXLEN', '~', maxlen, '*', 'op', 'ban', 'ip', target,
               'until', int(top), 'pbx_id', pbx, 'reason', why)
  end
end

-- duration 0 means "escalate": ban_time * factor ^ previous bans, capped at ban_max.
local function ban_end(k, duration, ban_time, factor, ban_max)
  if duration > 0 then return now + math.floor(duration) end
  local previous = tonumber(redis.call('HGET', k.record, 'bans') or '0')
  return now + math.floor(math.min(ban_time * (factor ^ previous), ban_max))
end

-- One more ban in this hour (the status page's chart); a new hour drops those over two
-- days old, so the hash keeps at most 49 fields.
local function count_hour(k)
  local hour = math.floor(now / 3600000)
  if redis.call('HINCRBY', k.by_hour, int(hour), 1) == 1 then
    for _, field in ipairs(redis.call('HKEYS', k.by_hour)) do
      if (tonumber(field) or 0) < hour - 48 then redis.call('HDEL', k.by_hour, field) end
    end
  end
end

-- Place (or lengthen: never shorten) `source`'s hold on `target` until `hold_end`.
-- `counts`: a new ban, recorded as such (previous bans + 1, stats); a restore is not.
-- Returns {the target's ban end, this source's hold end, 1 if the hold was placed, the
-- ban end before (0: not banned)}.
local function place_hold(k, target, source, hold_end, reason, pbx, counts, count, maxlen,
                          history)
  local holds = read_holds(k, target)
  local old_top = longest(holds)
  local mine = holds[source]
  if hold_end <= now or (mine and mine[1] >= hold_end) then
    return {old_top, mine and mine[1] or 0, 0, old_top}
  end
  holds[source] = {hold_end, reason}
  redis.call('HSET', k.holds, source, int(hold_end) .. ' ' .. reason)
  local top, why = longest(holds)
  publish(k, target, old_top, top, why, pbx, maxlen)
  if counts then
    local previous = tonumber(redis.call('HGET', k.record, 'bans') or '0')
    redis.call('HSET', k.record, 'since', int(now), 'pbx_id', pbx, 'bans', int(previous + 1),
               'count', int(count), 'last_seen', int(now))
    redis.call('HINCRBY', k.stats, 'bans', 1)
    count_hour(k)
  else
    redis.call('HSETNX', k.record, 'pbx_id', pbx)
  end
  redis.call('HSET', k.record, 'until', int(top), 'reason', why)
  redis.call('HSETNX', k.record, 'first_seen', int(now))
  redis.call('HDEL', k.record, 'unbanned_at')
  keep_record(k, top, history)
  return {top, hold_end, 1, old_top}
end
"""

# The clock and the holds' functions: what every script but the screening step begins with.
_COMMON = _CLOCK + _HOLDS

# The tail of both counting steps (a screened call, an authentication failure): the
# event joins the caller's sliding window (KEYS[1], one member each); at the threshold
# the caller is banned through the counting source's hold (the helpers are defined only
# then: the common call does not pay for them) and the window starts afresh.
# Needs the locals ip, threshold, window, ban_until, country; the KEYS and ARGV as SCREEN.
_WINDOW = (
    """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now - window))
redis.call('ZADD', KEYS[1], int(now), ARGV[9])
redis.call('PEXPIRE', KEYS[1], int(window))
local count = redis.call('ZCARD', KEYS[1])
if count >= threshold then
"""
    + _HOLDS
    + """
  local k = {record = KEYS[2], banned = KEYS[3], events = KEYS[5], stats = KEYS[6],
             holds = KEYS[7], by_hour = KEYS[8]}
  local hold_end = ban_end(k, 0, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]))
  ban_until = place_hold(k, ip, ARGV[8], hold_end, ARGV[8], ARGV[7], true, count, ARGV[10],
                         tonumber(ARGV[11]))[1]
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[4], ip)
  if country ~= '' then redis.call('HSET', KEYS[2], 'country', country) end
  return {'BANNED', count, ban_until, 1}
end
redis.call('ZADD', KEYS[4], int(now + window), ip)
return {'COUNTED', count, 0, 0}
"""
)

# KEYS: count, record, banned, counted, events, stats, holds, bans_by_hour
# ARGV: ip, threshold, window_ms, ban_time_ms, factor, ban_max_ms, pbx_id, source (the
#       threshold's hold, also its reason), member (unique per call), events_maxlen,
#       history_ms, injected (1: the session had stray lines, counted in stats for
#       `status`), prune (1: drop expired entries from the ban and counted lists; every
#       reader skips them, so this is housekeeping the caller asks for on some steps only,
#       keeping the common step short), country (the caller's, '' unknown: written to the
#       record when this call bans)
# Returns {result, count, ban_until_ms, new_ban (1 when this call made the ban)}
SCREEN = (
    _CLOCK
    + """
local ip = ARGV[1]
local threshold = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
if ARGV[13] == '1' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', int(now))
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', int(now))
end
redis.call('HINCRBY', KEYS[6], 'calls', 1)
if ARGV[12] == '1' then
  redis.call('HINCRBY', KEYS[6], 'injections', 1)
end
local ban_until = tonumber(redis.call('ZSCORE', KEYS[3], ip))
if ban_until and ban_until > now then
  local count = redis.call('HINCRBY', KEYS[2], 'count', 1)
  redis.call('HSET', KEYS[2], 'last_seen', int(now))
  return {'BANNED', count, ban_until, 0}
end
local country = ARGV[14] or ''
"""
    + _WINDOW
)

# KEYS: count, record, banned, counted, events, stats, holds, bans_by_hour
# ARGV: ip, source, duration_ms (0 = escalate), until_ms (0: now + duration), ban_time_ms,
#       factor, ban_max_ms, pbx_id, reason, events_maxlen, history_ms, counts (1: a new
#       ban; 0: a restored one, leaving the previous-ban count and stats alone)
# Returns {ban_until_ms, hold_until_ms, placed (0: this source already held it as long)}
BAN = (
    _COMMON
    + """
local k = {record = KEYS[2], banned = KEYS[3], events = KEYS[5], stats = KEYS[6],
           holds = KEYS[7], by_hour = KEYS[8]}
local ip = ARGV[1]
local hold_end = tonumber(ARGV[4])
if hold_end <= 0 then
  hold_end = ban_end(k, tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6]),
                     tonumber(ARGV[7]))
end
local count = redis.call('ZCARD', KEYS[1])
local placed = place_hold(k, ip, ARGV[2], hold_end, ARGV[9], ARGV[8], ARGV[12] == '1', count,
                          ARGV[10], tonumber(ARGV[11]))
if placed[1] > now then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[4], ip)
end
return placed
"""
)

# KEYS: banned, counted, events, stats, then count_1, record_1, holds_1, count_2, ...
# ARGV: pbx_id, events_maxlen, source ('': every hold, and the count is reset), ip_1, ...
# Returns per address {state, ban_until_ms}: state 0 this source held no ban there, 1 the
# ban ended, 2 the hold was lifted and others keep the address banned until ban_until_ms.
UNBAN = (
    _COMMON
    + """
local source = ARGV[3]
local out = {}
for i = 4, #ARGV do
  local ip = ARGV[i]
  local base = 5 + (i - 4) * 3
  local k = {banned = KEYS[1], events = KEYS[3], stats = KEYS[4], record = KEYS[base + 1],
             holds = KEYS[base + 2]}
  local old_top, top, why = 0, 0, ''
  if source == '' then
    old_top = tonumber(redis.call('ZSCORE', k.banned, ip)) or 0
    redis.call('DEL', KEYS[base], k.holds)
    redis.call('ZREM', KEYS[2], ip)
  else
    local holds = read_holds(k, ip)
    if holds[source] then
      old_top = longest(holds)
      holds[source] = nil
      redis.call('HDEL', k.holds, source)
      top, why = longest(holds)
    end
  end
  publish(k, ip, old_top, top, why, ARGV[1], ARGV[2])
  if old_top == 0 then
    out[#out + 1] = {0, 0}
  elseif top == 0 then
    if redis.call('EXISTS', k.record) == 1 then
      redis.call('HSET', k.record, 'until', '0', 'unbanned_at', int(now))
      if source == '' then redis.call('HSET', k.record, 'count', '0') end
    end
    out[#out + 1] = {1, 0}
  else
    if redis.call('EXISTS', k.record) == 1 then
      redis.call('HSET', k.record, 'until', int(top), 'reason', why)
    end
    out[#out + 1] = {2, int(top)}
  end
end
return out
"""
)

# KEYS: banned, events, epoch, stats, then record_1, holds_1, record_2, holds_2, ...
# ARGV: pbx_id, events_maxlen, history_ms, epoch token (set if none), reason, source
#       (the hold's: "restored"), then ip_1, until_ms_1, ip_2, until_ms_2, ...
# An agent writes back the bans it applied after Redis lost its data, each as a hold of
# its own that never shortens another (so agents healing at once agree, in any order); a
# ban that ended is skipped; an event goes out for each ban whose end moved, so agents
# that lost it apply it again. The epoch token is set only if there is none: the first
# healer's stays, and the others adopt it.
# Returns {epoch token in place, bans written}
RESTORE = (
    _COMMON
    + """
local written, n = 0, 4
for i = 7, #ARGV, 2 do
  local k = {record = KEYS[n + 1], holds = KEYS[n + 2], banned = KEYS[1], events = KEYS[2],
             stats = KEYS[4]}
  n = n + 2
  local placed = place_hold(k, ARGV[i], ARGV[6], tonumber(ARGV[i + 1]), ARGV[5], ARGV[1],
                            false, 0, ARGV[2], tonumber(ARGV[3]))
  if placed[3] == 1 then
    redis.call('HSETNX', k.record, 'bans', '1')
    written = written + 1
  end
end
redis.call('SET', KEYS[3], ARGV[4], 'NX')
return {redis.call('GET', KEYS[3]), written}
"""
)

# One authentication failure (a security event from Asterisk's AMI, auth.py): counted
# under the [auth] rules in counts of its own; at the threshold the hold `auth` (source
# and reason) is placed through the same place_hold as the screening step's (same ban
# list, history, escalation and events).
# KEYS: auth_count, record, banned, auth_counted, events, stats, holds, bans_by_hour
# ARGV: target, threshold, window_ms, ban_time_ms, factor, ban_max_ms, pbx_id, source,
#       member (unique per failure), events_maxlen, history_ms
# Returns {result, count, ban_until_ms, new_ban}, as SCREEN
AUTH_FAILURE = (
    _CLOCK
    + """
local ip, threshold, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('HINCRBY', KEYS[6], 'auth_failures', 1)
local ban_until = tonumber(redis.call('ZSCORE', KEYS[3], ip))
if ban_until and ban_until > now then
  return {'BANNED', redis.call('HINCRBY', KEYS[2], 'count', 1), ban_until, 0}
end
local country = ''
"""
    + _WINDOW
)

# A chunk of a blocklist feed (feeds.py): each target gets the feed's hold (source
# `feed:<name>`) until one refresh later, through the same place_hold as every ban (never
# shortening, the ban list and records following the longest hold). Not a new ban for
# escalation or the totals. `keep` 0: an event per changed target. Else no event per
# target: each target whose ban-list end changed is appended to the batch, `<target>
# <end ms>` lines (kept `keep` ms), and the caller sends one `sync` event naming the
# batch after the whole import, so agents apply just those entries in one firewall
# transaction instead of reading 100,000 events or the whole list.
# KEYS: banned, events, stats, batch, then record_1, holds_1, record_2, holds_2, ...
# ARGV: pbx_id, events_maxlen, history_ms, source, reason, until_ms, keep, target_1, ...
# Returns {holds placed or lengthened, bans started (targets not banned before),
#          entries appended to the batch}
FEED = (
    _COMMON
    + """
local keep = tonumber(ARGV[7])
local events = nil
if keep == 0 then events = KEYS[2] end
local placed, started, n = 0, 0, 4
local changed = {}
local hold_end = tonumber(ARGV[6])
local history = tonumber(ARGV[3])
for i = 8, #ARGV do
  local k = {banned = KEYS[1], events = events, stats = KEYS[3], record = KEYS[n + 1],
             holds = KEYS[n + 2]}
  n = n + 2
  local done = place_hold(k, ARGV[i], ARGV[4], hold_end, ARGV[5], ARGV[1], false, 0, ARGV[2],
                          history)
  if done[3] == 1 then
    placed = placed + 1
    if done[4] == 0 then started = started + 1 end
    if keep > 0 and done[1] ~= done[4] then
      changed[#changed + 1] = ARGV[i] .. ' ' .. int(done[1]) .. '\\n'
    end
  end
end
if #changed > 0 then
  redis.call('APPEND', KEYS[4], table.concat(changed))
  redis.call('PEXPIRE', KEYS[4], int(keep))
end
return {placed, started, #changed}
"""
)
# Read only: each ban's record fields and holds, for the ban list out (export.py). One
# script per page of targets instead of three commands each: a client-side pipeline of
# 300,000 commands cost ~10 s of Python for 100,000 bans, this ~1 s.
# KEYS: record and holds of each target, in pairs
# Returns per target its record hash then its holds hash, each flat
BAN_DETAILS = """
local out = {}
for i = 1, #KEYS, 2 do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
  out[#out + 1] = redis.call('HGETALL', KEYS[i + 1])
end
return out
"""

# A webhook's sender (notify.py): one process per cluster holds the lease and sends.
# KEYS: lease, cursor; ARGV: token, lease ms, cursor keep ms
# Returns 1 when the lease is (still) ours, 0 when another process holds it
NOTIFY_LEASE = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# Move a webhook's cursor past what its receiver got, only while the lease is ours (a
# sender that lost it must not move the cursor under the new one).
# KEYS: lease, cursor; ARGV: token, event id, cursor keep ms
# Returns 1 when moved, 0 when the lease is not ours
NOTIFY_CURSOR = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""

# A sender that stops gives its lease up, so another process takes over at once.
# KEYS: lease; ARGV: token. Returns 1 when it was ours.
NOTIFY_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""
