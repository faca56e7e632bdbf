"""Every Lua script, in one place: one atomic step per screened call, ban and unban.

Time comes from Redis (`TIME`), so every PBX of a cluster agrees on windows and ban
ends whatever its own clock says. Times are integer milliseconds. Numbers handed to
redis.call go through `int()` so Lua 5.1 (Redis) and Lua 5.4 (fakeredis) write the
same text.
"""

_COMMON = """
local function int(x) return string.format('%d', math.floor(x)) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Write a ban record, add the address to the ban list and append the ban event.
-- duration 0 means "escalate": ban_time * factor ^ previous bans, capped at ban_max.
local function write_ban(record, banned, events, stats, ip, duration, ban_time, factor,
                         ban_max, pbx, reason, count, maxlen, history)
  local previous = tonumber(redis.call('HGET', record, 'bans') or '0')
  if duration <= 0 then
    duration = math.min(ban_time * (factor ^ previous), ban_max)
  end
  local ban_until = now + math.floor(duration)
  redis.call('HSET', record, 'until', int(ban_until), 'since', int(now), 'reason', reason,
             'pbx_id', pbx, 'bans', int(previous + 1), 'count', int(count),
             'last_seen', int(now))
  redis.call('HSETNX', record, 'first_seen', int(now))
  redis.call('HDEL', record, 'unbanned_at')
  redis.call('PEXPIRE', record, int(duration + history))
  redis.call('ZADD', banned, int(ban_until), ip)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'op', 'ban', 'ip', ip,
             'until', int(ban_until), 'pbx_id', pbx, 'reason', reason)
  redis.call('HINCRBY', stats, 'bans', 1)
  return ban_until
end
"""

# KEYS: count, record, banned, counted, events, stats
# ARGV: ip, threshold, window_ms, ban_time_ms, factor, ban_max_ms, pbx_id, reason,
#       member (unique per call), events_maxlen, history_ms, injected (1: the session
#       had stray lines, counted in stats for `status`), prune (1: drop expired entries
#       from the ban and counted lists; every reader skips them, so this is housekeeping
#       the caller asks for on some steps only, keeping the common step short)
# Returns {result, count, ban_until_ms, new_ban (1 when this call made the ban)}
SCREEN = (
    _COMMON
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
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now - window))
redis.call('ZADD', KEYS[1], int(now), ARGV[9])
redis.call('PEXPIRE', KEYS[1], int(window))
local count = redis.call('ZCARD', KEYS[1])
if count >= threshold then
  ban_until = write_ban(KEYS[2], KEYS[3], KEYS[5], KEYS[6], ip, 0, tonumber(ARGV[4]),
                        tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8], count,
                        ARGV[10], tonumber(ARGV[11]))
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[4], ip)
  return {'BANNED', count, ban_until, 1}
end
redis.call('ZADD', KEYS[4], int(now + window), ip)
return {'COUNTED', count, 0, 0}
"""
)

# KEYS: count, record, banned, counted, events, stats
# ARGV: ip, duration_ms (0 = escalate), ban_time_ms, factor, ban_max_ms, pbx_id, reason,
#       events_maxlen, history_ms
# Returns ban_until_ms
BAN = (
    _COMMON
    + """
local ip = ARGV[1]
local count = redis.call('ZCARD', KEYS[1])
local ban_until = write_ban(KEYS[2], KEYS[3], KEYS[5], KEYS[6], ip, tonumber(ARGV[2]),
                            tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6],
                            ARGV[7], count, ARGV[8], tonumber(ARGV[9]))
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[4], ip)
return ban_until
"""
)

# KEYS: banned, counted, events, stats, then count_1, record_1, count_2, record_2, ...
# ARGV: pbx_id, events_maxlen, ip_1, ip_2, ...
# Returns the addresses that were on the ban list. Also resets each address's count.
UNBAN = (
    _COMMON
    + """
local lifted = {}
for i = 3, #ARGV do
  local ip = ARGV[i]
  local count_key = KEYS[5 + (i - 3) * 2]
  local record_key = KEYS[6 + (i - 3) * 2]
  redis.call('DEL', count_key)
  redis.call('ZREM', KEYS[2], ip)
  if redis.call('ZREM', KEYS[1], ip) == 1 then
    lifted[#lifted + 1] = ip
    if redis.call('EXISTS', record_key) == 1 then
      redis.call('HSET', record_key, 'until', '0', 'unbanned_at', int(now), 'count', '0')
    end
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'op', 'unban', 'ip', ip,
               'pbx_id', ARGV[1])
    redis.call('HINCRBY', KEYS[4], 'unbans', 1)
  end
end
return lifted
"""
)

# One authentication failure (a security event from Asterisk's AMI, auth.py): counted
# under the [auth] rules in counts of its own, banned through the same write_ban (same
# ban list, history, escalation and events) with reason 'auth'.
# KEYS: auth_count, record, banned, auth_counted, events, stats
# ARGV: ip, threshold, window_ms, ban_time_ms, factor, ban_max_ms, pbx_id, reason,
#       member (unique per failure), events_maxlen, history_ms
# Returns {result, count, ban_until_ms, new_ban}, as SCREEN
AUTH_FAILURE = (
    _COMMON
    + """
local ip, window = ARGV[1], tonumber(ARGV[3])
redis.call('HINCRBY', KEYS[6], 'auth_failures', 1)
local ban_until = tonumber(redis.call('ZSCORE', KEYS[3], ip))
if ban_until and ban_until > now then
  return {'BANNED', redis.call('HINCRBY', KEYS[2], 'count', 1), ban_until, 0}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now - window))
redis.call('ZADD', KEYS[1], int(now), ARGV[9])
redis.call('PEXPIRE', KEYS[1], int(window))
local failures = redis.call('ZCARD', KEYS[1])
if failures < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[4], int(now + window), ip)
  return {'COUNTED', failures, 0, 0}
end
ban_until = write_ban(KEYS[2], KEYS[3], KEYS[5], KEYS[6], ip, 0, tonumber(ARGV[4]),
                      tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8], failures,
                      ARGV[10], tonumber(ARGV[11]))
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[4], ip)
return {'BANNED', failures, ban_until, 1}
"""
)
