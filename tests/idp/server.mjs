// OpenID Provider test fixture for portcullis (tests only, never for production).
//
// Runs the certified `oidc-provider` library on http://127.0.0.1:PORT with:
//   - RS256 signing keys generated at start (node:crypto)
//   - client_credentials, authorization_code (+PKCE), refresh_token (rotating),
//     RFC 8693 token exchange (custom grant)
//   - JWT access tokens for every configured resource indicator
//   - development interactions (login with any name, consent with one click)
//   - test-control endpoints under /__test/ (key rotation, stats, fault injection)
//
// Usage: node server.mjs [--port N] [--config FILE] [--exit-on-stdin-close]
// Prints exactly one line `IDP_READY http://127.0.0.1:PORT` on stdout when listening.
// See README.md for the configuration format.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as querystring from 'node:querystring';

import Provider, { errors } from 'oidc-provider';

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const TT_ACCESS_TOKEN = 'urn:ietf:params:oauth:token-type:access_token';
const TT_JWT = 'urn:ietf:params:oauth:token-type:jwt';
const HOST = '127.0.0.1';

// ---------------------------------------------------------------------------
// arguments and configuration
// ---------------------------------------------------------------------------

function parseArgs(argv) {
  const out = { port: undefined, config: undefined, exitOnStdinClose: false };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    const [flag, inline] = arg.includes('=') ? [arg.slice(0, arg.indexOf('=')), arg.slice(arg.indexOf('=') + 1)] : [arg, undefined];
    const value = () => {
      if (inline !== undefined) return inline;
      i += 1;
      if (i >= argv.length) throw new Error(`missing value for ${flag}`);
      return argv[i];
    };
    switch (flag) {
      case '--port': out.port = value(); break;
      case '--config': out.config = value(); break;
      case '--exit-on-stdin-close': out.exitOnStdinClose = true; break;
      case '-h':
      case '--help':
        process.stdout.write('usage: node server.mjs [--port N] [--config FILE] [--exit-on-stdin-close]\n');
        process.exit(0);
        break;
      default:
        throw new Error(`unknown argument: ${arg}`);
    }
  }
  return out;
}

const DEFAULT_CONFIG = {
  access_token_ttl: 600,
  refresh_token_ttl: 14 * 24 * 60 * 60,
  rotate_refresh_token: true,
  resources: [
    { resource: 'api://orders', scopes: ['orders:read', 'orders:write'] },
    { resource: 'api://inventory', scopes: ['inventory:read'] },
  ],
  clients: [
    {
      client_id: 'svc-basic',
      client_secret: 'svc-basic-secret',
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['client_credentials', TOKEN_EXCHANGE],
      extra_claims: { roles: ['admin'], tid: 'tenant-1' },
    },
    {
      client_id: 'svc-post',
      client_secret: 'svc-post-secret',
      token_endpoint_auth_method: 'client_secret_post',
      grant_types: ['client_credentials'],
    },
    {
      client_id: 'web-app',
      client_secret: 'web-app-secret',
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['authorization_code', 'refresh_token'],
      redirect_uris: ['http://127.0.0.1:9/callback'],
    },
  ],
  accounts: {},
};

// keys of a client entry that are ours, not oidc-provider client metadata
const CLIENT_FIXTURE_KEYS = new Set(['extra_claims', 'access_token_ttl', 'default_resource']);

function loadConfig(file) {
  if (!file) return structuredClone(DEFAULT_CONFIG);
  const raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    throw new Error('config must be a JSON object');
  }
  return { ...structuredClone(DEFAULT_CONFIG), ...raw };
}

function positiveInt(value, what) {
  if (value === undefined || value === null) return undefined;
  if (!Number.isSafeInteger(value) || value <= 0) throw new Error(`${what} must be a positive integer (seconds)`);
  return value;
}

function normalizeConfig(cfg) {
  const resources = new Map();
  for (const r of cfg.resources || []) {
    const id = typeof r === 'string' ? r : r.resource;
    if (typeof id !== 'string' || !id) throw new Error('resources[].resource must be a non-empty string');
    const scopes = typeof r === 'string' ? [] : (r.scopes || []);
    resources.set(id, {
      resource: id,
      scopes,
      audience: typeof r === 'string' ? undefined : r.audience,
      access_token_ttl: positiveInt(typeof r === 'string' ? undefined : r.access_token_ttl, `resources[${id}].access_token_ttl`),
      format: typeof r === 'string' || r.format === undefined ? 'jwt' : r.format,
    });
    if (!['jwt', 'opaque'].includes(resources.get(id).format)) {
      throw new Error(`resources[${id}].format must be "jwt" or "opaque"`);
    }
  }

  const clients = new Map();
  const providerClients = [];
  for (const c of cfg.clients || []) {
    if (!c.client_id) throw new Error('clients[].client_id is required');
    const grantTypes = c.grant_types || ['client_credentials'];
    const metadata = {
      token_endpoint_auth_method: 'client_secret_basic',
      redirect_uris: [],
      response_types: grantTypes.includes('authorization_code') ? ['code'] : [],
      ...Object.fromEntries(Object.entries(c).filter(([k]) => !CLIENT_FIXTURE_KEYS.has(k))),
      grant_types: grantTypes,
    };
    clients.set(c.client_id, {
      extra_claims: c.extra_claims || {},
      access_token_ttl: positiveInt(c.access_token_ttl, `clients[${c.client_id}].access_token_ttl`),
      default_resource: c.default_resource,
    });
    providerClients.push(metadata);
  }

  const accounts = new Map(Object.entries(cfg.accounts || {}));

  return {
    resources,
    clients,
    providerClients,
    accounts,
    accessTokenTTL: positiveInt(cfg.access_token_ttl, 'access_token_ttl'),
    refreshTokenTTL: positiveInt(cfg.refresh_token_ttl, 'refresh_token_ttl') ?? 14 * 24 * 60 * 60,
    rotateRefreshToken: cfg.rotate_refresh_token !== false,
    extraScopes: cfg.scopes || [],
    claims: cfg.claims,
  };
}

// ---------------------------------------------------------------------------
// signing keys
// ---------------------------------------------------------------------------

function generateSigningKey() {
  const { privateKey, publicKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  const kid = `k-${crypto.randomBytes(9).toString('base64url')}`;
  return {
    kid,
    privateJwk: { ...jwk, kid, alg: 'RS256', use: 'sig' },
    publicKey,
  };
}

// ---------------------------------------------------------------------------
// state
// ---------------------------------------------------------------------------

const args = parseArgs(process.argv.slice(2));
const config = normalizeConfig(loadConfig(args.config));
const requestedPort = Number.parseInt(args.port ?? process.env.IDP_PORT ?? '0', 10);
if (!Number.isInteger(requestedPort) || requestedPort < 0 || requestedPort > 65535) {
  throw new Error(`invalid port: ${args.port ?? process.env.IDP_PORT}`);
}

let keys = [generateSigningKey()]; // keys[0] signs
const cookieKeys = [crypto.randomBytes(32).toString('base64url')];
let issuer;
let provider;
let providerCallback;

// claims for tokens issued by the token-exchange grant (token object -> claims)
const exchangeClaims = new WeakMap();

function newStats() {
  return {
    discovery: 0,
    jwks: 0,
    token: { total: 0, by_grant_type: {} },
    authorization: 0,
    interaction: 0,
    userinfo: 0,
    introspection: 0,
    revocation: 0,
    other: 0,
  };
}
let stats = newStats();
const faults = new Map(); // endpoint -> { mode, delay_ms, remaining }
const FAULT_ENDPOINTS = new Set(['token', 'jwks', 'discovery', 'introspection']);

// ---------------------------------------------------------------------------
// provider
// ---------------------------------------------------------------------------

// In-memory storage adapter shared by every provider instance this process
// builds. oidc-provider's built-in memory adapter keeps a store per Provider
// instance, and a key rotation builds a new Provider (see /__test/rotate): a
// shared store keeps sessions, interactions, grants, codes and refresh tokens
// valid across rotations.
const store = new Map(); // key -> { payload, expiresAt (ms) | undefined }
const grantIndex = new Map(); // grantId -> Set(key)
const secondaryIndex = new Map(); // 'uid:..' / 'userCode:..' -> id

function storeGet(key) {
  const entry = store.get(key);
  if (!entry) return undefined;
  if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return entry.payload;
}

function sweepStore() {
  const now = Date.now();
  for (const [key, entry] of store) {
    if (entry.expiresAt !== undefined && entry.expiresAt <= now) store.delete(key);
  }
  for (const [grantId, keys] of grantIndex) {
    for (const key of keys) if (!store.has(key)) keys.delete(key);
    if (keys.size === 0) grantIndex.delete(grantId);
  }
  for (const [key, id] of secondaryIndex) {
    const model = key.startsWith('uid:') ? 'Session' : 'DeviceCode';
    if (!store.has(`${model}:${id}`)) secondaryIndex.delete(key);
  }
}
setInterval(sweepStore, 60_000).unref();

const GRANTABLE = new Set(['AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode', 'BackchannelAuthenticationRequest', 'PreAuthorizedCode']);

class SharedMemoryAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + (expiresIn + 15) * 1000 : undefined;
    store.set(key, { payload, expiresAt });
    if (this.model === 'Session' && payload.uid) secondaryIndex.set(`uid:${payload.uid}`, id);
    if (payload.userCode) secondaryIndex.set(`userCode:${payload.userCode}`, id);
    if (GRANTABLE.has(this.model) && payload.grantId) {
      if (!grantIndex.has(payload.grantId)) grantIndex.set(payload.grantId, new Set());
      grantIndex.get(payload.grantId).add(key);
    }
  }

  async find(id) {
    return storeGet(this.key(id));
  }

  async findByUid(uid) {
    const id = secondaryIndex.get(`uid:${uid}`);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = secondaryIndex.get(`userCode:${userCode}`);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = storeGet(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const key of grantIndex.get(grantId) || []) store.delete(key);
    grantIndex.delete(grantId);
  }
}

function accessTokenTTL(token, client, fallback) {
  const perClient = client ? config.clients.get(client.clientId)?.access_token_ttl : undefined;
  return perClient ?? token.resourceServer?.accessTokenTTL ?? config.accessTokenTTL ?? fallback;
}

function resourceServerInfo(resourceIndicator) {
  const r = config.resources.get(resourceIndicator);
  if (!r) return undefined;
  return {
    scope: r.scopes.join(' '),
    audience: r.audience,
    accessTokenTTL: r.access_token_ttl,
    accessTokenFormat: r.format,
    ...(r.format === 'jwt' ? { jwt: { sign: { alg: 'RS256' } } } : {}),
  };
}

function buildProvider() {
  const staticScopes = ['openid', 'offline_access', 'profile', 'email', ...config.extraScopes];
  const p = new Provider(issuer, {
    adapter: SharedMemoryAdapter,
    clients: config.providerClients,
    jwks: { keys: keys.map((k) => k.privateJwk) },
    cookies: {
      keys: cookieKeys,
      long: { httpOnly: true, sameSite: 'lax', signed: true },
      short: { httpOnly: true, sameSite: 'lax', signed: true },
    },
    scopes: [...new Set(staticScopes)],
    responseTypes: ['code', 'none'],
    claims: config.claims || {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
    },
    features: {
      devInteractions: { enabled: true },
      clientCredentials: { enabled: true },
      // RFC 9449: a token request with a DPoP proof gets a DPoP-bound token (`cnf.jkt`).
      dPoP: { enabled: true },
      introspection: { enabled: true },
      // RFC 8705 certificate-bound access tokens for clients registered with
      // `tls_client_certificate_bound_access_tokens: true`. This fixture runs on plain http, so the
      // "TLS client certificate" is the URL-encoded PEM in the `x-test-client-cert` request header
      // (idp.py: client_credentials(..., client_cert_pem=...)). Test use only.
      mTLS: {
        enabled: true,
        certificateBoundAccessTokens: true,
        getCertificate(ctx) {
          const pem = ctx.get('x-test-client-cert');
          return pem ? decodeURIComponent(pem) : undefined;
        },
      },
      revocation: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      resourceIndicators: {
        enabled: true,
        async defaultResource(ctx, client, oneOf) {
          if (oneOf) return oneOf;
          return config.clients.get(client.clientId)?.default_resource;
        },
        async useGrantedResource() {
          return true;
        },
        async getResourceServerInfo(ctx, resourceIndicator) {
          const info = resourceServerInfo(resourceIndicator);
          if (!info) throw new errors.InvalidTarget(`unknown resource indicator: ${resourceIndicator}`);
          return info;
        },
      },
    },
    async findAccount(ctx, sub) {
      const account = config.accounts.get(sub) || {};
      return {
        accountId: sub,
        async claims() {
          return { ...(account.claims || {}), sub };
        },
      };
    },
    async extraTokenClaims(ctx, token) {
      if (exchangeClaims.has(token)) return exchangeClaims.get(token);
      const clientClaims = config.clients.get(token.clientId)?.extra_claims || {};
      const accountClaims = token.accountId
        ? (config.accounts.get(token.accountId)?.token_claims || {})
        : {};
      const merged = { ...clientClaims, ...accountClaims };
      return Object.keys(merged).length ? merged : undefined;
    },
    ttl: {
      AccessToken: (ctx, token, client) => accessTokenTTL(token, client, 3600),
      ClientCredentials: (ctx, token, client) => accessTokenTTL(token, client, 600),
      AuthorizationCode: 60,
      IdToken: 3600,
      RefreshToken: config.refreshTokenTTL,
      Interaction: 3600,
      Session: 14 * 24 * 60 * 60,
      Grant: 14 * 24 * 60 * 60,
    },
    rotateRefreshToken: config.rotateRefreshToken,
    // Keep plain http + loopback working: no secure cookies are forced because
    // ctx.secure is false on plain http, and the issuer is an http URL.
    renderError(ctx, out) {
      ctx.type = 'json';
      ctx.body = out;
    },
  });

  p.registerGrantType(
    TOKEN_EXCHANGE,
    tokenExchangeHandler,
    ['subject_token', 'subject_token_type', 'requested_token_type', 'actor_token', 'actor_token_type', 'audience', 'resource', 'scope'],
    ['audience', 'resource'],
  );

  p.on('server_error', (ctx, err) => {
    process.stderr.write(`idp server_error: ${err?.stack || err}\n`);
  });
  // one line per rejected token request, with oidc-provider's internal detail
  p.on('grant.error', (ctx, err) => {
    process.stderr.write(`idp grant.error: grant_type=${ctx.oidc?.params?.grant_type} ${err.error}: ${err.error_description}${err.error_detail ? ` (${err.error_detail})` : ''}\n`);
  });

  return p;
}

function installProvider() {
  provider = buildProvider();
  providerCallback = provider.callback();
}

// ---------------------------------------------------------------------------
// RFC 8693 token exchange
// ---------------------------------------------------------------------------

function b64urlJson(part) {
  return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
}

// Verifies a JWT issued (signed) by this provider with one of its current keys.
function verifyOwnJwt(token) {
  if (typeof token !== 'string') throw new errors.InvalidGrant('subject_token is not a JWT');
  const parts = token.split('.');
  if (parts.length !== 3) throw new errors.InvalidGrant('subject_token is not a JWT');
  let header;
  let payload;
  try {
    header = b64urlJson(parts[0]);
    payload = b64urlJson(parts[1]);
  } catch {
    throw new errors.InvalidGrant('subject_token is not a JWT');
  }
  if (header.alg !== 'RS256') throw new errors.InvalidGrant('subject_token must be signed with RS256');
  const candidates = header.kid ? keys.filter((k) => k.kid === header.kid) : keys;
  const data = Buffer.from(`${parts[0]}.${parts[1]}`);
  const signature = Buffer.from(parts[2], 'base64url');
  const ok = candidates.some((k) => crypto.verify('sha256', data, k.publicKey, signature));
  if (!ok) throw new errors.InvalidGrant('subject_token signature invalid or signed by an unknown key');
  if (payload.iss !== issuer) throw new errors.InvalidGrant('subject_token issuer mismatch');
  if (typeof payload.exp !== 'number') throw new errors.InvalidGrant('subject_token has no exp');
  if (typeof payload.sub !== 'string' || !payload.sub) throw new errors.InvalidGrant('subject_token has no sub');
  return { header, payload };
}

const REGISTERED_CLAIMS = new Set([
  'iss', 'sub', 'aud', 'exp', 'nbf', 'iat', 'jti', 'scope', 'client_id', 'act', 'cnf', 'authorization_details', 'may_act',
]);

async function tokenExchangeHandler(ctx) {
  // the client has already been authenticated by oidc-provider's token endpoint
  // pipeline (client_secret_basic / client_secret_post / ...), and the grant type
  // checked against the client's grant_types.
  const { params, client } = ctx.oidc;

  if (!params.subject_token) throw new errors.InvalidRequest('missing required parameter \'subject_token\'');
  if (!params.subject_token_type) throw new errors.InvalidRequest('missing required parameter \'subject_token_type\'');
  if (![TT_ACCESS_TOKEN, TT_JWT].includes(params.subject_token_type)) {
    throw new errors.InvalidRequest('unsupported subject_token_type');
  }
  if (params.actor_token || params.actor_token_type) {
    throw new errors.InvalidRequest('actor_token is not supported by this test provider');
  }
  const requestedType = params.requested_token_type || TT_ACCESS_TOKEN;
  if (![TT_ACCESS_TOKEN, TT_JWT].includes(requestedType)) {
    throw new errors.InvalidRequest('unsupported requested_token_type');
  }

  const { payload: subject } = verifyOwnJwt(params.subject_token);
  const now = Math.floor(Date.now() / 1000);
  const remaining = subject.exp - now;
  if (remaining < 1) throw new errors.InvalidGrant('subject_token is expired');

  // target: resource (URI) or audience (logical name); both must name a configured resource
  const asList = (v) => (v === undefined ? [] : (Array.isArray(v) ? v : [v]));
  let targets = [...asList(params.resource), ...asList(params.audience)];
  targets = [...new Set(targets)];
  if (targets.length === 0) {
    const fallback = config.clients.get(client.clientId)?.default_resource;
    if (fallback) targets = [fallback];
  }
  if (targets.length === 0) throw new errors.InvalidTarget('resource or audience is required');
  if (targets.length > 1) throw new errors.InvalidTarget('only a single resource/audience is supported');
  const [target] = targets;
  let resourceId = target;
  if (!config.resources.has(resourceId)) {
    // allow `audience` to name a resource by its configured audience value
    resourceId = [...config.resources.values()].find((r) => r.audience === target)?.resource;
  }
  if (!resourceId) throw new errors.InvalidTarget(`unknown resource/audience: ${target}`);
  const info = resourceServerInfo(resourceId);
  const resourceServer = new provider.ResourceServer(resourceId, info);

  const allowed = new Set(info.scope.split(' ').filter(Boolean));
  const requested = params.scope !== undefined
    ? params.scope.split(' ').filter(Boolean)
    : (typeof subject.scope === 'string' ? subject.scope.split(' ').filter(Boolean) : []);
  const scope = requested.filter((s) => allowed.has(s)).join(' ') || undefined;

  const ttl = Math.min(accessTokenTTL({ resourceServer }, client, 3600), remaining);

  const extra = {};
  for (const [k, v] of Object.entries(subject)) {
    if (!REGISTERED_CLAIMS.has(k)) extra[k] = v;
  }
  extra.act = subject.act ? { sub: client.clientId, act: subject.act } : { sub: client.clientId };

  const at = new provider.AccessToken({
    accountId: subject.sub,
    client,
    gty: 'token_exchange',
    scope,
    expiresIn: ttl,
  });
  at.resourceServer = resourceServer;
  exchangeClaims.set(at, extra);

  ctx.oidc.entity('AccessToken', at);
  const value = await at.save();

  ctx.body = {
    access_token: value,
    issued_token_type: requestedType,
    token_type: 'Bearer',
    expires_in: ttl,
    ...(scope ? { scope } : {}),
  };
}

// ---------------------------------------------------------------------------
// HTTP front: /__test/ control endpoints, stats, fault injection, dispatch
// ---------------------------------------------------------------------------

function classify(pathname) {
  switch (true) {
    case pathname === '/.well-known/openid-configuration': return 'discovery';
    case pathname === '/jwks': return 'jwks';
    case pathname === '/token': return 'token';
    case pathname === '/token/introspection': return 'introspection';
    case pathname === '/token/revocation': return 'revocation';
    case pathname === '/auth' || pathname.startsWith('/auth/'): return 'authorization';
    case pathname.startsWith('/interaction/'): return 'interaction';
    case pathname === '/me': return 'userinfo';
    default: return 'other';
  }
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 1024 * 1024) throw new Error('request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

function sendJson(res, status, body) {
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(status, {
    'content-type': 'application/json; charset=utf-8',
    'content-length': data.length,
    'cache-control': 'no-store',
  });
  res.end(data);
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

function jwksKids() {
  return keys.map((k) => k.kid);
}

async function handleTest(req, res, url) {
  const path = url.pathname.replace(/\/+$/, '');
  let body = {};
  if (req.method === 'POST') {
    const raw = (await readBody(req)).toString('utf8').trim();
    if (raw) {
      try {
        body = JSON.parse(raw);
      } catch {
        return sendJson(res, 400, { error: 'invalid_json' });
      }
    }
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
      return sendJson(res, 400, { error: 'body must be a JSON object' });
    }
  }

  if (path === '/__test/rotate' && req.method === 'POST') {
    const key = generateSigningKey();
    const previous = keys;
    keys = body.remove_old ? [key] : [key, ...previous];
    // oidc-provider reads its keystore once, at construction: build a new
    // provider instance with the new key set. Tokens, grants, sessions and
    // interactions live in the (module-global) memory adapter and survive.
    try {
      installProvider();
    } catch (err) {
      keys = previous;
      throw err;
    }
    return sendJson(res, 200, { kid: key.kid, kids: jwksKids(), removed: body.remove_old ? previous.map((k) => k.kid) : [] });
  }
  if (path === '/__test/keys' && req.method === 'GET') {
    return sendJson(res, 200, { signing_kid: keys[0].kid, kids: jwksKids() });
  }
  if (path === '/__test/stats' && req.method === 'GET') {
    return sendJson(res, 200, stats);
  }
  if (path === '/__test/stats/reset' && req.method === 'POST') {
    stats = newStats();
    return sendJson(res, 200, stats);
  }
  if (path === '/__test/fail' && req.method === 'POST') {
    const { endpoint, mode } = body;
    const delayMs = body.delay_ms ?? 0;
    const times = body.times ?? null;
    if (mode === 'none' && (endpoint === undefined || endpoint === 'all')) {
      faults.clear();
      return sendJson(res, 200, { faults: Object.fromEntries(faults) });
    }
    if (!FAULT_ENDPOINTS.has(endpoint)) {
      return sendJson(res, 400, { error: `endpoint must be one of ${[...FAULT_ENDPOINTS].join(', ')}` });
    }
    if (!(mode === 'none' || mode === 'slow' || mode === 'garbage' || mode === 'reset' || /^[1-5]\d\d$/.test(String(mode)))) {
      return sendJson(res, 400, { error: 'mode must be "500" (or another 3-digit status), "slow", "garbage", "reset" or "none"' });
    }
    if (!Number.isSafeInteger(delayMs) || delayMs < 0) return sendJson(res, 400, { error: 'delay_ms must be a non-negative integer' });
    if (times !== null && (!Number.isSafeInteger(times) || times <= 0)) return sendJson(res, 400, { error: 'times must be a positive integer' });
    if (mode === 'none') {
      faults.delete(endpoint);
    } else {
      faults.set(endpoint, { mode: String(mode), delay_ms: delayMs, remaining: times });
    }
    return sendJson(res, 200, { faults: Object.fromEntries(faults) });
  }
  if (path === '/__test/fail' && req.method === 'GET') {
    return sendJson(res, 200, { faults: Object.fromEntries(faults) });
  }
  return sendJson(res, 404, { error: 'not_found' });
}

// returns true when the fault fully handled the response
async function applyFault(endpoint, req, res) {
  const fault = faults.get(endpoint);
  if (!fault) return false;
  if (fault.remaining !== null) {
    fault.remaining -= 1;
    if (fault.remaining <= 0) faults.delete(endpoint);
  }
  if (fault.delay_ms > 0 && fault.mode !== 'slow') await sleep(fault.delay_ms);
  switch (fault.mode) {
    case 'slow':
      await sleep(fault.delay_ms || 5000);
      return false;
    case 'garbage': {
      const data = Buffer.from('<<this is not json>> {"keys": [ garbage');
      res.writeHead(200, {
        'content-type': endpoint === 'jwks' ? 'application/jwk-set+json' : 'application/json',
        'content-length': data.length,
      });
      res.end(data);
      return true;
    }
    case 'reset':
      req.socket.destroy();
      return true;
    default: {
      const status = Number.parseInt(fault.mode, 10);
      sendJson(res, status, { error: 'server_error', error_description: `injected fault (${status})` });
      return true;
    }
  }
}

async function handle(req, res) {
  const url = new URL(req.url, issuer);
  if (url.pathname.startsWith('/__test/')) {
    await handleTest(req, res, url);
    return;
  }

  const endpoint = classify(url.pathname);
  if (endpoint === 'token') {
    stats.token.total += 1;
    if (req.method === 'POST') {
      // buffer the body to count by grant_type; oidc-provider then uses req.body
      const raw = await readBody(req);
      req.body = raw;
      const grantType = String(querystring.parse(raw.toString('utf8')).grant_type ?? 'missing');
      stats.token.by_grant_type[grantType] = (stats.token.by_grant_type[grantType] || 0) + 1;
    }
  } else {
    stats[endpoint] += 1;
  }

  if (await applyFault(endpoint, req, res)) return;

  await providerCallback(req, res);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    process.stderr.write(`idp fixture error: ${err?.stack || err}\n`);
    if (!res.headersSent) {
      sendJson(res, 500, { error: 'fixture_error', error_description: String(err?.message || err) });
    } else {
      res.destroy();
    }
  });
});
server.keepAliveTimeout = 5000;

function shutdown() {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (args.exitOnStdinClose) {
  process.stdin.on('end', shutdown);
  process.stdin.on('close', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}

server.listen(requestedPort, HOST, () => {
  const { port } = server.address();
  issuer = `http://${HOST}:${port}`;
  installProvider();
  process.stdout.write(`IDP_READY ${issuer}\n`);
});
