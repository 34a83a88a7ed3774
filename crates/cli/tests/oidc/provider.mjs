#!/usr/bin/env node
// Test-only OpenID provider for deltasync's integration tests, built on the
// certified `oidc-provider` package. See README.md in this folder.
//
//   node provider.mjs --port PORT --keys FILE [--host 127.0.0.1]
//   node provider.mjs --new-keys FILE
//
// stdout carries exactly one line, `issuer http://HOST:PORT`, once listening.
// Everything else (oidc-provider notices, errors) goes to stderr.

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import { parseArgs } from 'node:util';

// oidc-provider prints some notices with console.info (i.e. stdout); the
// parent test reads stdout for the issuer line only, so send them to stderr.
console.log = console.info = console.debug = console.error;

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    keys: { type: 'string' },
    host: { type: 'string', default: '127.0.0.1' },
    'new-keys': { type: 'string' },
  },
});

function fail(msg) {
  console.error(`provider.mjs: ${msg}`);
  process.exit(2);
}

// ---------------------------------------------------------------- keys

// A fresh key set: one RS256 (RSA 2048) and one ES256 (P-256) private JWK.
function newKeySet() {
  const jwk = (type, opts, alg) => ({
    ...crypto.generateKeyPairSync(type, opts).privateKey.export({ format: 'jwk' }),
    kid: crypto.randomBytes(12).toString('hex'),
    use: 'sig',
    alg,
  });
  return {
    keys: [
      jwk('rsa', { modulusLength: 2048 }, 'RS256'),
      jwk('ec', { namedCurve: 'P-256' }, 'ES256'),
    ],
  };
}

function writeKeySet(file) {
  const set = newKeySet();
  fs.writeFileSync(file, `${JSON.stringify(set, null, 2)}\n`, { mode: 0o600 });
  return set;
}

if (args['new-keys']) {
  writeKeySet(args['new-keys']);
  process.exit(0);
}

if (args.port === undefined || !/^\d+$/.test(args.port)) fail('--port PORT is required (0 = any free port)');
if (!args.keys) fail('--keys FILE is required');

const jwks = fs.existsSync(args.keys)
  ? JSON.parse(fs.readFileSync(args.keys, 'utf8'))
  : writeKeySet(args.keys);

// ---------------------------------------------------------------- listen

// Bind first so that `--port 0` is resolved before the issuer is fixed.
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(Number(args.port), args.host, resolve);
}).catch((err) => fail(`cannot listen on ${args.host}:${args.port}: ${err.message}`));

const { port } = server.address();
const hostPart = args.host.includes(':') ? `[${args.host}]` : args.host;
const issuer = `http://${hostPart}:${port}`;

// ---------------------------------------------------------------- provider

// Loaded only now, so `--new-keys` does not print oidc-provider's notices.
const { default: Provider } = await import('oidc-provider');

// Redirect URI of every client. Nothing listens there: the test endpoint
// below reads the authorization code out of the Location header.
const REDIRECT_URI = 'http://127.0.0.1/cb';
const client = (client_id, alg) => ({
  client_id,
  token_endpoint_auth_method: 'none', // public client, PKCE is mandatory
  grant_types: ['authorization_code'],
  response_types: ['code'],
  redirect_uris: [REDIRECT_URI],
  id_token_signed_response_alg: alg,
});

const provider = new Provider(issuer, {
  jwks,
  clients: [client('app-1', 'RS256'), client('app-2', 'RS256'), client('app-es', 'ES256')],
  routes: { jwks: '/jwks' },
  ttl: { IdToken: 3600 }, // seconds
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  features: { devInteractions: { enabled: false } },
  // Our own interaction endpoint (handled by the middleware below).
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  // Any subject exists; its only claim is `sub`.
  findAccount: (ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
});
// Plain http on loopback: nothing to configure (cookies are only marked
// `secure` when the request itself is https). No proxy in front of us.

let jwksFetches = 0;

provider.use(async (ctx, next) => {
  // Count requests of the jwks_uri.
  if (ctx.path === '/jwks') jwksFetches += 1;

  if (ctx.method === 'GET' && ctx.path === '/test/jwks-fetches') {
    ctx.body = { count: jwksFetches };
    return;
  }

  if (ctx.method === 'GET' && ctx.path === '/test/id-token') {
    const { sub, client_id: clientId, nonce } = ctx.query;
    if (!sub || !clientId) {
      ctx.status = 400;
      ctx.body = { error: 'sub and client_id query parameters are required' };
      return;
    }
    try {
      ctx.body = { id_token: await idTokenViaCodeFlow(sub, clientId, nonce) };
    } catch (err) {
      console.error(`/test/id-token failed: ${err.message}`);
      ctx.status = 400;
      ctx.body = { error: err.message };
    }
    return;
  }

  // Interaction endpoint: log in the subject from `login_hint` and grant
  // whatever the client asked for, without any UI.
  const m = ctx.method === 'GET' && ctx.path.match(/^\/interaction\/([^/]+)$/);
  if (m) {
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    let result;
    if (details.prompt.name === 'login') {
      if (!details.params.login_hint) ctx.throw(400, 'login_hint (the subject) is required');
      result = { login: { accountId: details.params.login_hint } };
    } else if (details.prompt.name === 'consent') {
      const grant = new provider.Grant({
        accountId: details.session.accountId,
        clientId: details.params.client_id,
      });
      const { missingOIDCScope, missingOIDCClaims, missingResourceScopes } = details.prompt.details;
      if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(' '));
      if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
      for (const [indicator, scopes] of Object.entries(missingResourceScopes ?? {})) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
      result = { consent: { grantId: await grant.save() } };
    } else {
      ctx.throw(501, `unsupported prompt ${details.prompt.name}`);
    }
    // Same as provider.interactionFinished, but the Koa way.
    ctx.status = 303;
    ctx.redirect(await provider.interactionResult(ctx.req, ctx.res, result));
    return;
  }

  await next();
});

// Drive the authorization code flow with PKCE against our own HTTP endpoints
// (GET /auth -> /interaction/... -> /auth/... -> redirect with code ->
// POST /token), carrying the provider's cookies by hand, and return the
// id_token that oidc-provider issued.
async function idTokenViaCodeFlow(sub, clientId, nonce) {
  const verifier = crypto.randomBytes(32).toString('base64url');
  const challenge = crypto.createHash('sha256').update(verifier).digest('base64url');
  const auth = new URL('/auth', issuer);
  auth.search = new URLSearchParams({
    client_id: clientId,
    response_type: 'code',
    scope: 'openid',
    redirect_uri: REDIRECT_URI,
    code_challenge: challenge,
    code_challenge_method: 'S256',
    state: crypto.randomBytes(8).toString('hex'),
    login_hint: sub,
    ...(nonce ? { nonce } : {}),
  });

  const cookies = new Map();
  let url = auth.href;
  let code;
  for (let hop = 0; hop < 10 && !code; hop += 1) {
    const res = await fetch(url, {
      redirect: 'manual',
      headers: { cookie: [...cookies].map(([k, v]) => `${k}=${v}`).join('; ') },
    });
    for (const c of res.headers.getSetCookie()) {
      const [pair] = c.split(';');
      const i = pair.indexOf('=');
      cookies.set(pair.slice(0, i), pair.slice(i + 1));
    }
    const location = res.headers.get('location');
    if (!location) {
      // oidc-provider renders errors as a small HTML page; keep its text only.
      const text = (await res.text()).replace(/<style[\s\S]*?<\/style>/g, '').replace(/<[^>]+>/g, ' ');
      throw new Error(`flow stopped at ${new URL(url).pathname}: HTTP ${res.status}: ${text.replace(/\s+/g, ' ').trim()}`);
    }
    const next = new URL(location, url);
    if (next.href.startsWith(REDIRECT_URI)) {
      const error = next.searchParams.get('error');
      if (error) throw new Error(`${error}: ${next.searchParams.get('error_description')}`);
      code = next.searchParams.get('code');
    }
    url = next.href;
  }
  if (!code) throw new Error('no authorization code after 10 redirects');

  const res = await fetch(new URL('/token', issuer), {
    method: 'POST',
    body: new URLSearchParams({
      grant_type: 'authorization_code',
      code,
      redirect_uri: REDIRECT_URI,
      code_verifier: verifier,
      client_id: clientId,
    }),
  });
  const body = await res.json();
  if (!res.ok || !body.id_token) throw new Error(`token endpoint: HTTP ${res.status} ${JSON.stringify(body)}`);
  return body.id_token;
}

// ---------------------------------------------------------------- serve

server.on('request', provider.callback());
process.stdout.write(`issuer ${issuer}\n`);
console.error(`provider.mjs: listening, issuer ${issuer}, keys ${args.keys} (kids ${jwks.keys.map((k) => k.kid).join(', ')})`);

// Clean exit on SIGTERM / SIGINT: stop listening, drop keep-alive sockets.
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
